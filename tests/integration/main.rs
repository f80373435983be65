//! ferry integration tests: real `ferry` processes over loopback TCP, real
//! image files and loop devices. Modules by area.

mod backlog;
mod bad_input;
mod bpf;
mod cli;
mod config_server;
mod config_web;
mod crash;
mod damage;
mod export;
mod failover;
mod metrics;
mod operate;
mod postgres_harness;
mod process_server;
mod replication;
mod retention;
mod safety;
mod two_sites;

//! `STATE/kmod.catchup`: the ranges the kernel module handed over from its
//! bitmap that the master target has not yet made durable (the module no
//! longer holds them, so this file is the only place they are kept). Its
//! format is in docs/formats.md; the agent reads and writes it through its
//! `StateDir` (moved here from the agent's state.rs unchanged).

pub const CATCHUP_KIND: &str = "ferry-kmod-catchup";
pub const CATCHUP_VERSION: u32 = 1;

/// Contents of `STATE/kmod.catchup`: every hand-over of the kernel
/// module's bitmap since the last one made durable, each with the module
/// sequence number at which the stream must ship it (its ranges hold
/// changes newer than every record before that place). Written before the
/// agent ships any of it, removed once the master target made all of it
/// durable, so an agent that stops in between ships them again instead of
/// resyncing the disk.
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Catchup {
    pub handovers: Vec<Handover>,
}

#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Handover {
    /// Module sequence number of the hand-over.
    pub seq: u64,
    /// Byte ranges `[start, end)` of the disk.
    pub ranges: Vec<(u64, u64)>,
}

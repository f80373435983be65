//! Tests of the datastore as a whole: a disk applied to through [`Disk`],
//! then read back through recovery and verify (the layers above it).

use super::disk::{Disk, Op};
use super::folder::DiskError;
use super::journal::{JournalReader, KIND_UNDO, KIND_UNDO_ZERO};
use ferry_proto::PointKind;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

mod disk {
    use super::*;

    /// A disk that keeps every point: these tests cut points at times near
    /// the epoch, which the default retention would drop as too old.
    pub(super) fn open(d: &Path) -> Disk {
        let disk = Disk::open(d, "d", 1 << 20, [1; 16]).unwrap().0;
        crate::store::retention::store(&disk.paths, &crate::store::retention::Policy::keep_everything()).unwrap();
        disk
    }

    pub(super) fn replica(d: &Path) -> Vec<u8> {
        fs::read(d.join("d").join("replica.img")).unwrap()
    }

    /// Invariant 4: a batch cut short after its pre-images were journaled and
    /// part of the replica was overwritten is rolled back at the next open.
    #[test]
    fn uncommitted_batch_is_rolled_back_on_open() {
        let t = tempfile::tempdir().unwrap();
        let mut disk = open(t.path());
        disk.apply(&[Op::Write { seq: 1, offset: 0, data: vec![1; 8192] }, Op::Tag { seq: 2, time_ns: 5, kind: PointKind::Crash }])
            .unwrap();
        let committed = replica(t.path());
        // Simulate a crash mid-batch: pre-images durable, replica partly
        // written, no COMMIT.
        disk.journal.undo(3, 4096, &committed[4096..12288]);
        disk.journal.sync().unwrap();
        disk.replica.write_all_at(&[9; 4096], 4096).unwrap();
        drop(disk);
        let disk = open(t.path());
        assert_eq!(disk.durable_seq, 2);
        assert_eq!(replica(t.path()), committed);
        // The journal now ends at the last COMMIT: no seq-3 record is left.
        let recs = JournalReader::open(&disk.paths.journal).unwrap().scan(0).unwrap();
        assert!(recs.iter().all(|r| r.seq <= 2), "{recs:?}");
    }

    /// Copy on first write per interval: a block overwritten many times
    /// between two points costs one pre-image in the journal, and every
    /// point still recovers exactly.
    #[test]
    fn hot_blocks_keep_one_pre_image_per_interval() {
        let t = tempfile::tempdir().unwrap();
        let mut disk = open(t.path());
        let mut seqs = 1u64..;
        let mut want = Vec::new();
        for round in 0..4u8 {
            // 200 rewrites of the same two blocks, in batches of 10.
            for b in 0..20u8 {
                let ops: Vec<Op> = (0..10u8)
                    .map(|i| Op::Write { seq: seqs.next().unwrap(), offset: u64::from(i % 2) * 4096, data: vec![round * 50 + b + i; 4096] })
                    .collect();
                disk.apply(&ops).unwrap();
            }
            want.push(replica(t.path()));
            disk.apply(&[Op::Tag { seq: seqs.next().unwrap(), time_ns: u64::from(round), kind: PointKind::Crash }]).unwrap();
        }
        let undo: Vec<_> = JournalReader::open(&disk.paths.journal)
            .unwrap()
            .scan(0)
            .unwrap()
            .into_iter()
            .filter(|r| r.kind == KIND_UNDO || r.kind == KIND_UNDO_ZERO)
            .collect();
        // Two blocks, one pre-image each per interval (4 intervals), not 800.
        assert_eq!(undo.len(), 8, "{} pre-images journaled", undo.len());
        let pts = crate::store::catalog::read_points(&disk.paths.points).unwrap().0;
        let out = t.path().join("out.img");
        for (p, w) in pts.iter().zip(&want) {
            crate::store::recover::recover(t.path(), "d", p, &out, crate::store::recover::Format::Raw).unwrap();
            assert!(fs::read(&out).unwrap() == *w, "point {} differs", p.id);
        }
    }

    /// A batch cut short whose pre-images went partly to the batch journal
    /// (ranges already written since the last point) is rolled back from
    /// both journals.
    #[test]
    fn a_torn_batch_rolls_back_from_both_journals() {
        let t = tempfile::tempdir().unwrap();
        let mut disk = open(t.path());
        disk.apply(&[Op::Write { seq: 1, offset: 0, data: vec![1; 8192] }, Op::Tag { seq: 2, time_ns: 5, kind: PointKind::Crash }])
            .unwrap();
        disk.apply(&[Op::Write { seq: 3, offset: 0, data: vec![2; 8192] }]).unwrap();
        let committed = replica(t.path());
        // Crash mid-batch: seq 4 rewrites [0, 8192) (in the interval's set:
        // its pre-image goes to the batch journal) and [8192, 12288) (a
        // first write: the journal); both durable, the replica written, no
        // COMMIT.
        disk.batch.reset().unwrap();
        disk.batch.undo(4, 0, &committed[0..8192]);
        disk.batch.sync().unwrap();
        disk.journal.undo(4, 8192, &committed[8192..12288]);
        disk.journal.sync().unwrap();
        disk.replica.write_all_at(&[9; 12288], 0).unwrap();
        drop(disk);
        let disk = open(t.path());
        assert_eq!(disk.durable_seq, 3);
        assert_eq!(replica(t.path()), committed);
        let b = JournalReader::open(&disk.paths.batch).unwrap().scan(0).unwrap();
        assert!(b.is_empty(), "the batch journal is emptied by the repair: {b:?}");
    }

    #[test]
    fn overlapping_ops_in_one_batch_keep_each_pre_image() {
        let t = tempfile::tempdir().unwrap();
        let mut disk = open(t.path());
        disk.apply(&[
            Op::Write { seq: 1, offset: 0, data: vec![1; 4096] },
            Op::Tag { seq: 2, time_ns: 1, kind: PointKind::Crash },
            Op::Write { seq: 3, offset: 0, data: vec![2; 4096] },
            Op::Tag { seq: 4, time_ns: 2, kind: PointKind::Crash },
            Op::Write { seq: 5, offset: 0, data: vec![3; 4096] },
        ])
        .unwrap();
        let pts = crate::store::catalog::read_points(&disk.paths.points).unwrap().0;
        assert_eq!(pts.len(), 2);
        let out = t.path().join("out.img");
        for (p, want) in pts.iter().zip([1u8, 2]) {
            crate::store::recover::recover(t.path(), "d", p, &out, crate::store::recover::Format::Raw).unwrap();
            let got = fs::read(&out).unwrap();
            assert!(got[..4096].iter().all(|&b| b == want), "point {} should hold {want}", p.id);
        }
    }
}

mod damage {
    use super::*;

    fn two_batches(d: &Path) -> PathBuf {
        let (mut disk, _) = Disk::open(d, "d", 1 << 20, [1; 16]).unwrap();
        disk.apply(&[Op::Write { seq: 1, offset: 0, data: vec![1; 4096] }]).unwrap();
        disk.apply(&[Op::Write { seq: 2, offset: 0, data: vec![2; 4096] }, Op::Tag { seq: 3, time_ns: 1, kind: PointKind::Crash }])
            .unwrap();
        disk.apply(&[Op::Write { seq: 4, offset: 0, data: vec![4; 4096] }]).unwrap();
        disk.paths.journal.clone()
    }

    /// File position of the first record with `seq`.
    fn pos_of(j: &Path, seq: u64) -> u64 {
        JournalReader::open(j).unwrap().scan(0).unwrap().iter().find(|r| r.seq == seq).unwrap().pos
    }

    #[test]
    fn damage_before_a_commit_is_refused_not_truncated() {
        let t = tempfile::tempdir().unwrap();
        let j = two_batches(t.path());
        let len = fs::metadata(&j).unwrap().len();
        // Flip a byte in the UNDO record of seq 4, after the newest point
        // and before the COMMIT of seq 4.
        let f = OpenOptions::new().write(true).open(&j).unwrap();
        f.write_all_at(&[0xee], pos_of(&j, 4) + 9).unwrap();
        let err = Disk::open(t.path(), "d", 1 << 20, [1; 16]).err().expect("must refuse");
        assert!(matches!(err, DiskError::Damaged { .. }), "{err}");
        assert_eq!(fs::metadata(&j).unwrap().len(), len, "nothing was cut");
        // Recovery of the point, which needs that record, refuses too.
        let pts = crate::store::catalog::read_points(&t.path().join("d").join("points.log")).unwrap().0;
        let r = crate::store::recover::recover(t.path(), "d", &pts[0], &t.path().join("out"), crate::store::recover::Format::Raw);
        assert!(matches!(r, Err(crate::store::recover::RecoverError::Disk(DiskError::Damaged { .. }))), "{r:?}");
    }

    #[test]
    fn a_torn_tail_is_cut_and_the_disk_opens() {
        let t = tempfile::tempdir().unwrap();
        let j = two_batches(t.path());
        let len = fs::metadata(&j).unwrap().len();
        let f = OpenOptions::new().write(true).open(&j).unwrap();
        f.write_all_at(&[0x55; 40], len).unwrap(); // half a record after the last COMMIT
        let (disk, _) = Disk::open(t.path(), "d", 1 << 20, [1; 16]).unwrap();
        assert_eq!(disk.durable_seq, 4);
        assert_eq!(fs::metadata(&j).unwrap().len(), len);
    }

    #[test]
    fn a_missing_journal_with_points_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let j = two_batches(t.path());
        fs::remove_file(j).unwrap();
        assert!(matches!(Disk::open(t.path(), "d", 1 << 20, [1; 16]), Err(DiskError::Damaged { .. })));
    }

    /// A master target killed mid-batch, and no stream ever opens the disk
    /// again (the source site is gone): `ferry verify` (and every recovery)
    /// settles the folder first, rolling back the torn batch, instead of
    /// calling the chunks it had overwritten damaged.
    #[test]
    fn a_folder_left_mid_batch_settles_instead_of_reading_as_damaged() {
        let t = tempfile::tempdir().unwrap();
        let mut disk = super::disk::open(t.path());
        disk.apply(&[Op::Write { seq: 1, offset: 0, data: vec![1; 8192] }, Op::Tag { seq: 2, time_ns: 5, kind: PointKind::Crash }])
            .unwrap();
        disk.sync_sums().unwrap();
        let committed = super::disk::replica(t.path());
        disk.journal.undo(3, 0, &committed[0..4096]);
        disk.journal.sync().unwrap();
        disk.replica.write_all_at(&[9; 4096], 0).unwrap();
        disk.failed = true; // a crash: nothing more is made durable
        drop(disk);
        let o = crate::store::verify::verify(t.path(), "d", 0).unwrap();
        assert!(o.ok(), "{:?}", o.damage);
        assert_eq!(super::disk::replica(t.path()), committed, "the torn batch was rolled back");
    }

    /// Sums written after the last mark that never reached the disk (a
    /// power cut): settling hashes again every range of the mark's interval,
    /// so verify finds nothing wrong with a healthy replica.
    #[test]
    fn sums_lost_after_the_mark_are_hashed_again() {
        let t = tempfile::tempdir().unwrap();
        let mut disk = super::disk::open(t.path());
        disk.apply(&[Op::Write { seq: 1, offset: 0, data: vec![1; 4096] }, Op::Tag { seq: 2, time_ns: 5, kind: PointKind::Crash }])
            .unwrap();
        disk.sync_sums().unwrap();
        // Two more batches, the second rewriting a range of the first (its
        // pre-image goes to the batch journal), sums not made durable.
        disk.apply(&[Op::Write { seq: 3, offset: 200 << 10, data: vec![3; 4096] }]).unwrap();
        disk.apply(&[Op::Write { seq: 4, offset: 200 << 10, data: vec![4; 4096] }, Op::Write { seq: 5, offset: 0, data: vec![5; 4096] }])
            .unwrap();
        let sums_path = disk.paths.sums.clone();
        disk.failed = true;
        drop(disk);
        // The power cut: the sums of chunks 0 and 3 are as they were before.
        let f = OpenOptions::new().write(true).open(&sums_path).unwrap();
        f.write_all_at(&[0u8; 16], 4096 + 3 * 16).unwrap();
        f.write_all_at(&crate::store::sums::chunk_sum(&[1u8; 4096].iter().copied().chain([0u8; 61440]).collect::<Vec<_>>()), 4096).unwrap();
        let o = crate::store::verify::verify(t.path(), "d", 0).unwrap();
        assert!(o.ok(), "{:?}", o.damage);
        // And a flipped replica byte is still found after all that.
        let r = OpenOptions::new().write(true).open(t.path().join("d").join("replica.img")).unwrap();
        r.write_all_at(&[0xee], 100 << 10).unwrap();
        let o = crate::store::verify::verify(t.path(), "d", 0).unwrap();
        assert_eq!(o.damage.len(), 1, "{:?}", o.damage);
        assert_eq!(o.damage[0].offset, 64 << 10);
    }
}

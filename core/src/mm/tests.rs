//! Unit tests of the reference address space.

extern crate std;

use crate::alloc_util::fail_after;
use crate::error::Error;
use crate::probe::ObjectId;
use crate::rcu::{Rcu, SlotRcu};
use alloc::vec::Vec;

use crate::mm::{AddressSpace, AddressSpaceOps, MmId, PAGE_SIZE, VmFlags, VmaInfo};

const P: u64 = PAGE_SIZE;
type Mm = AddressSpace;

fn exec(start: u64, end: u64, pgoff: u64, o: u64) -> VmaInfo {
    VmaInfo {
        start,
        end,
        pgoff,
        flags: VmFlags::EXEC,
        object: ObjectId(o),
    }
}

#[test]
fn map_unmap_split_protect_remap() {
    let rcu = SlotRcu::new();
    let mm = Mm::new(MmId(1));
    let w = mm.write();
    w.map(&rcu, 10 * P, 4 * P, 0, ObjectId(7), VmFlags::EXEC)
        .unwrap();
    w.map(
        &rcu,
        20 * P,
        2 * P,
        8 * P,
        ObjectId(8),
        VmFlags::EXEC | VmFlags::SHARED,
    )
    .unwrap();
    assert_eq!(w.find(11 * P + 5), Some(exec(10 * P, 14 * P, 0, 7)));
    assert_eq!(w.find(14 * P), None);
    // Unmap the middle: two pieces remain, offsets kept.
    let gone = w.unmap(&rcu, 11 * P, 2 * P).unwrap();
    assert_eq!(gone, std::vec![exec(11 * P, 13 * P, P, 7)]);
    assert_eq!(w.find(10 * P), Some(exec(10 * P, 11 * P, 0, 7)));
    assert_eq!(w.find(13 * P), Some(exec(13 * P, 14 * P, 3 * P, 7)));
    // Split and protect.
    w.split(&rcu, 21 * P).unwrap();
    assert_eq!(w.mappings().len(), 4);
    w.protect(&rcu, 21 * P, P, VmFlags::NONE).unwrap();
    assert_eq!(w.find(21 * P).unwrap().flags, VmFlags::NONE);
    assert_eq!(
        w.find(20 * P).unwrap().flags,
        VmFlags::EXEC | VmFlags::SHARED
    );
    // Remap moves a whole mapping.
    w.remap(&rcu, 13 * P, P, 40 * P).unwrap();
    assert_eq!(w.find(40 * P), Some(exec(40 * P, 41 * P, 3 * P, 7)));
    assert_eq!(w.find(13 * P), None);
    // Replace what a mapping maps.
    w.replace_object(&rcu, 40 * P, ObjectId(9), 0).unwrap();
    assert_eq!(w.find(40 * P), Some(exec(40 * P, 41 * P, 0, 9)));
    // Fork copies, clear empties.
    let child: Mm = w.fork(&rcu, MmId(2)).unwrap();
    assert_eq!(child.mappings(), w.mappings());
    assert_eq!(w.clear(&rcu).unwrap().len(), 4);
    assert!(w.mappings().is_empty());
    drop(w);
    rcu.synchronize();
}

#[test]
fn bad_ranges_are_errors_and_change_nothing() {
    let rcu = SlotRcu::new();
    let mm = Mm::new(MmId(1));
    let w = mm.write();
    w.map(&rcu, 10 * P, 4 * P, 0, ObjectId(7), VmFlags::EXEC)
        .unwrap();
    let before = w.mappings();
    assert_eq!(
        w.map(&rcu, 12 * P, 4 * P, 0, ObjectId(8), VmFlags::EXEC),
        Err(Error::Overlap)
    );
    assert_eq!(
        w.map(&rcu, 9 * P, 2 * P, 0, ObjectId(8), VmFlags::EXEC),
        Err(Error::Overlap)
    );
    assert_eq!(
        w.map(&rcu, 30 * P, 0, 0, ObjectId(8), VmFlags::EXEC),
        Err(Error::BadRange)
    );
    assert_eq!(
        w.map(&rcu, 30 * P + 1, P, 0, ObjectId(8), VmFlags::EXEC),
        Err(Error::BadRange)
    );
    assert_eq!(
        w.map(&rcu, u64::MAX - P + 1, 2 * P, 0, ObjectId(8), VmFlags::EXEC),
        Err(Error::BadRange)
    );
    assert_eq!(w.unmap(&rcu, 13 * P, 2 * P), Err(Error::NotMapped));
    assert_eq!(w.unmap(&rcu, 30 * P, P), Err(Error::NotMapped));
    assert_eq!(
        w.protect(&rcu, 8 * P, 4 * P, VmFlags::NONE),
        Err(Error::NotMapped)
    );
    assert_eq!(w.remap(&rcu, 10 * P, 2 * P, 40 * P), Err(Error::NotMapped));
    assert_eq!(w.split(&rcu, 30 * P), Err(Error::NotMapped));
    assert_eq!(
        w.replace_object(&rcu, 30 * P, ObjectId(1), 0),
        Err(Error::NotMapped)
    );
    w.map(&rcu, 40 * P, P, 0, ObjectId(8), VmFlags::EXEC)
        .unwrap();
    assert_eq!(w.remap(&rcu, 40 * P, P, 13 * P), Err(Error::Overlap));
    w.unmap(&rcu, 40 * P, P).unwrap();
    assert_eq!(w.mappings(), before);
    // Allocation failure at every point of a map and a middle unmap: nothing visible changes.
    for n in 0..40 {
        fail_after(Some(n));
        let r = w.map(&rcu, 50 * P, P, 0, ObjectId(3), VmFlags::EXEC);
        fail_after(None);
        match r {
            Err(Error::NoMemory) => assert_eq!(w.mappings(), before),
            Ok(_) => {
                w.unmap(&rcu, 50 * P, P).unwrap();
                break;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    let addr_map = |w: &crate::mm::MmWriter<'_, crate::lock::SpinLock>| {
        (10..14)
            .map(|p| w.find(p * P).map(|i| (i.object, i.offset_of(p * P))))
            .collect::<Vec<_>>()
    };
    let want = addr_map(&w);
    for n in 0..40 {
        fail_after(Some(n));
        let r = w.unmap(&rcu, 11 * P, P);
        fail_after(None);
        match r {
            // A split may remain, but every address still maps the same (object, offset).
            Err(Error::NoMemory) => assert_eq!(addr_map(&w), want),
            Ok(_) => break,
            Err(e) => panic!("{e:?}"),
        }
    }
    drop(w);
    rcu.synchronize();
}

#[test]
fn speculation_fails_while_a_writer_is_inside_and_validates_after() {
    let rcu = SlotRcu::new();
    let mm = Mm::new(MmId(1));
    mm.write()
        .map(&rcu, 10 * P, 4 * P, 0, ObjectId(7), VmFlags::EXEC)
        .unwrap();
    let reader = rcu.register().unwrap();
    let _g = rcu.read_lock(&reader);
    let mut s = mm.speculate_begin().unwrap();
    assert_eq!(
        mm.speculate_find(&mut s, 12 * P + 3),
        Some((ObjectId(7), 2 * P + 3))
    );
    assert!(mm.speculate_validate(&s));
    // A change in between invalidates.
    let mut s = mm.speculate_begin().unwrap();
    assert!(mm.speculate_find(&mut s, 12 * P).is_some());
    mm.write().protect(&rcu, 10 * P, P, VmFlags::EXEC).unwrap();
    assert!(!mm.speculate_validate(&s));
    // Non-executable and unmapped addresses have no speculative answer.
    let mut s = mm.speculate_begin().unwrap();
    assert_eq!(mm.speculate_find(&mut s, 30 * P), None);
}

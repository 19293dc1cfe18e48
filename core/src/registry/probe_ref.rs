//! [`ProbeRef`]: a counted reference that keeps a probe allocated beyond any read section
//! (taken with increment-not-zero, so a dying probe is never resurrected).

use super::Registry;
use crate::lock::RawLock;
use crate::probe::{ConsumerHandle, Probe};
use crate::rcu::Rcu;
use alloc::sync::Arc;
use core::fmt;
use core::ptr::NonNull;

/// A counted reference to a probe: keeps it allocated beyond any read section.
///
/// Dropping the last reference of a probe that has no consumers removes it from the tree
/// (taking the tree lock briefly) and frees it after a grace period — so do not drop one inside
/// a context that must not take the registry's raw lock.
pub struct ProbeRef<
    'a,
    C: ?Sized + Send + Sync + 'static,
    R: Rcu,
    L: RawLock,
    const N: usize,
    P: ConsumerHandle<Target = C> = Arc<C>,
> {
    pub(super) reg: &'a Registry<C, R, L, N, P>,
    pub(super) probe: NonNull<Probe<P>>,
}

// SAFETY: a counted reference to a `Sync` probe in a `Sync` registry; dropping it from another
// thread runs the same final put as anywhere.
unsafe impl<
    C: ?Sized + Send + Sync,
    R: Rcu,
    L: RawLock,
    const N: usize,
    P: ConsumerHandle<Target = C>,
> Send for ProbeRef<'_, C, R, L, N, P>
{
}
// SAFETY: shared access only reads.
unsafe impl<
    C: ?Sized + Send + Sync,
    R: Rcu,
    L: RawLock,
    const N: usize,
    P: ConsumerHandle<Target = C>,
> Sync for ProbeRef<'_, C, R, L, N, P>
{
}

impl<
    C: ?Sized + Send + Sync + 'static,
    R: Rcu,
    L: RawLock,
    const N: usize,
    P: ConsumerHandle<Target = C>,
> core::ops::Deref for ProbeRef<'_, C, R, L, N, P>
{
    type Target = Probe<P>;
    fn deref(&self) -> &Probe<P> {
        // SAFETY: the reference count keeps the probe allocated.
        let p = unsafe { self.probe.as_ref() };
        p.free_check.check();
        p
    }
}

impl<
    C: ?Sized + Send + Sync + 'static,
    R: Rcu,
    L: RawLock,
    const N: usize,
    P: ConsumerHandle<Target = C>,
> Drop for ProbeRef<'_, C, R, L, N, P>
{
    fn drop(&mut self) {
        // SAFETY: we own one reference.
        unsafe { self.reg.put(self.probe.as_ptr()) }
    }
}

impl<
    C: ?Sized + Send + Sync + 'static,
    R: Rcu,
    L: RawLock,
    const N: usize,
    P: ConsumerHandle<Target = C>,
> fmt::Debug for ProbeRef<'_, C, R, L, N, P>
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

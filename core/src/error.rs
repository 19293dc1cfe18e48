//! The one error type of probe-core.
//!
//! Every bad input has its own variant, and every variant has a test. Library code returns these;
//! it does not panic on bad input. A failed operation changes nothing.

use core::fmt;

/// Everything that can go wrong in a probe-core operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Error {
    /// No probe is registered at that (object, offset).
    UnknownProbe,
    /// The probe exists, but that consumer is not registered on it.
    UnknownConsumer,
    /// That consumer is already registered on that probe.
    DuplicateConsumer,
    /// The probe is being torn down (unused, waiting to be freed) and cannot be re-registered
    /// until that finishes: run `Optimizer::wait_for_optimizer` (or the registry's `sync`) and
    /// try again.
    Busy,
    /// An allocation failed. Nothing was changed.
    NoMemory,
    /// An address range is empty, not page-aligned, or overflows.
    BadRange,
    /// The range overlaps an existing mapping.
    Overlap,
    /// (Part of) the range is not mapped, or no mapping is exactly that range.
    NotMapped,
    /// The offset is past the end of the object.
    OffsetOutOfRange,
    /// The instruction at that offset already is a trap instruction: it cannot be probed.
    ExistingTrap,
    /// The address is inside an instruction, not at its first byte.
    InsideInstruction,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Error::UnknownProbe => "no probe is registered at that object and offset",
            Error::UnknownConsumer => "that consumer is not registered on the probe",
            Error::DuplicateConsumer => "that consumer is already registered on the probe",
            Error::Busy => {
                "the probe is being freed; wait for the optimizer (or a grace period) and retry"
            }
            Error::NoMemory => "out of memory",
            Error::BadRange => "the range is empty, not page-aligned, or overflows",
            Error::Overlap => "the range overlaps an existing mapping",
            Error::NotMapped => "the range is not (exactly) mapped",
            Error::OffsetOutOfRange => "the offset is past the end of the object",
            Error::ExistingTrap => "the instruction there already is a trap; it cannot be probed",
            Error::InsideInstruction => "the address is inside an instruction, not at its start",
        })
    }
}

impl core::error::Error for Error {}

/// Shorthand for results of probe-core operations.
pub type Result<T, E = Error> = core::result::Result<T, E>;

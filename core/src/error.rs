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
    /// One of the embedder's own operations failed (a code write, a mapping, a page it could
    /// not pin); the value is the embedder's code for it (an errno, say). probe-core never makes
    /// one up: it passes on what an embedder's trait method returned.
    Embedder(i32),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Error::Embedder(code) = self {
            return write!(f, "the embedder's operation failed (code {code})");
        }
        f.write_str(match self {
            Error::UnknownProbe => "no probe is registered at that object and offset",
            Error::UnknownConsumer => "that consumer is not registered on the probe",
            Error::DuplicateConsumer => "that consumer is already registered on the probe",
            Error::NoMemory => "out of memory",
            Error::BadRange => "the range is empty, not page-aligned, or overflows",
            Error::Overlap => "the range overlaps an existing mapping",
            Error::NotMapped => "the range is not (exactly) mapped",
            Error::OffsetOutOfRange => "the offset is past the end of the object",
            Error::ExistingTrap => "the instruction there already is a trap; it cannot be probed",
            Error::InsideInstruction => "the address is inside an instruction, not at its start",
            Error::Embedder(_) => "the embedder's operation failed",
        })
    }
}

impl core::error::Error for Error {}

/// Shorthand for results of probe-core operations.
pub type Result<T, E = Error> = core::result::Result<T, E>;

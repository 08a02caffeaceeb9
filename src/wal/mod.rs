//! The segment write-ahead log: checksummed records in local segment files.
//! (Module map; the writer helper owns this file and fills in the overview.)

pub mod format;
pub mod payload;
pub mod reader;
pub mod recovery;
pub mod writer;

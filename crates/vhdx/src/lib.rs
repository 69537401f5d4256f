//! VHDX virtual disks (MS-VHDX): format parsing, creation, the metadata log, differencing chains,
//! resize, merge, compact, convert, check; a `BlockBackend` for the VMM.

//! The probe guest image, built by this crate's build script from `guest/probe`.

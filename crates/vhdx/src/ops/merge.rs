//! Merging a differencing disk into its parent.

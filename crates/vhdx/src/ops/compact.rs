//! Compacting: reclaiming zero and unused blocks.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CompactReport {
    pub blocks_zeroed: u64,
    pub blocks_moved: u64,
    pub file_size_before: u64,
    pub file_size_after: u64,
}

//! The switch's configuration types live in `vireo-netconfig` (so the API needs no switch
//! runtime); re-exported here under their historical paths.

pub use vireo_netconfig::*;

#[cfg(test)]
mod tests {
    #[test]
    fn the_config_crate_agrees_on_the_largest_frame() {
        assert_eq!(super::MAX_FRAME as usize, vireo_netport::MAX_FRAME);
    }
}

pub mod ipam;
pub mod netns;

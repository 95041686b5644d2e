//! probunet: train and evaluate the Probabilistic U-Net (Kohl et al. 2018) on ambiguous
//! medical segmentation.
pub mod bench;
pub mod config;
pub mod data;
pub mod device;
pub mod doctor;
pub mod eval;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod sweep;
pub mod tensorboard;
pub mod train;

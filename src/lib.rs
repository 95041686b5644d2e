//! probunet: train and evaluate the Probabilistic U-Net (Kohl et al. 2018) on ambiguous
//! medical segmentation.
pub mod device;
pub mod doctor;
pub mod metrics;
pub mod model;
pub mod tensorboard;

//! probunet: train and evaluate the Probabilistic U-Net (Kohl et al. 2018) on ambiguous
//! medical segmentation.
//!
//! Data flows one way: [`data`] (readers, stores, the loader) -> [`train`] (over
//! [`model`]) -> the run folder ([`run`]) -> [`eval`], [`sweep`], [`predict`], [`export`],
//! which read it.
//! [`score`] is the one sampling and scoring path of validation and eval; [`figure`] and
//! [`tensorboard`] are leaves that draw labelled PNGs and write event files. The library
//! never prints: it returns values and emits typed events; the binary's `cli` module
//! decides what a person sees.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
pub mod bench;
pub mod config;
pub mod data;
pub mod device;
pub mod doctor;
pub mod eval;
pub mod export;
pub mod figure;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod predict;
pub mod run;
pub mod runs;
pub mod score;
pub mod seed;
pub mod sweep;
pub mod sys;
pub mod tensorboard;
pub mod train;

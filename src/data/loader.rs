//! Training batches from a store: the split's items kept on the CPU or moved once to the
//! GPU, a seeded shuffle per epoch, and one annotator drawn at random per sample per draw
//! (as the seed does), with optional flips and 90-degree rotations.
//!
//! The loader's whole position (epoch, cursor, RNG states) is a small serialisable value,
//! so a checkpoint can resume the exact same sequence of batches.
use super::split::SplitName;
use super::store::Store;
use super::DataError;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, TchError, Tensor};

/// Random dihedral transforms applied per sample, to image and mask alike.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Augment {
    /// Random horizontal flips.
    pub flips: bool,
    /// Random rotations by multiples of 90 degrees (square images only).
    pub rotations: bool,
}

/// One training batch on the loader's device: images f32 `[B, 1, H, W]`, the drawn
/// annotators' masks f32 `[B, 1, H, W]`.
#[derive(Debug)]
pub struct Batch {
    pub images: Tensor,
    pub masks: Tensor,
}

/// Where the loader stands; restoring it replays the same batches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoaderState {
    pub epoch: u64,
    /// Next position in this epoch's order.
    pub cursor: usize,
    /// The shuffling RNG as it was when this epoch's order was drawn.
    pub epoch_rng: Pcg64,
    /// The RNG for annotator draws and augmentation.
    pub draw_rng: Pcg64,
}

#[derive(Debug)]
pub struct Loader {
    images: Tensor,
    /// `[N * A, 1, H, W]` u8, so item i's annotator a is row `i * A + a`.
    masks: Tensor,
    annotators: i64,
    batch: usize,
    augment: Augment,
    order: Vec<i64>,
    state: LoaderState,
    device: Device,
}

impl Loader {
    /// A loader over `part` of `store`, with the arrays copied to `device` once.
    pub fn new(
        store: &Store,
        part: SplitName,
        batch: usize,
        augment: Augment,
        seed: u64,
        device: Device,
    ) -> Result<Self, DataError> {
        let items = store.split(part);
        let shape = store.manifest.shape;
        if batch == 0 || items.len() < batch {
            return Err(DataError::Store {
                path: store.dir.clone(),
                why: format!(
                    "the {part} split has {} items, fewer than a batch of {batch}",
                    items.len()
                ),
            });
        }
        if augment.rotations && shape.height != shape.width {
            return Err(DataError::Store {
                path: store.dir.clone(),
                why: format!(
                    "rotations need square images, these are {}x{}",
                    shape.height, shape.width
                ),
            });
        }
        let index = Tensor::f_from_slice(&items.iter().map(|&i| i as i64).collect::<Vec<_>>())?;
        let images = store
            .images
            .f_index_select(0, &index)?
            .f_to_device(device)?;
        let (h, w) = (shape.height as i64, shape.width as i64);
        let masks = store
            .masks
            .f_index_select(0, &index)?
            .f_reshape([-1, 1, h, w])?
            .f_to_device(device)?;
        let mut rng = Pcg64::seed_from_u64(seed);
        let draw_rng = Pcg64::seed_from_u64(rng.gen());
        let mut loader = Loader {
            images,
            masks,
            annotators: shape.annotators as i64,
            batch,
            augment,
            order: (0..items.len() as i64).collect(),
            state: LoaderState {
                epoch: 0,
                cursor: 0,
                epoch_rng: rng,
                draw_rng,
            },
            device,
        };
        loader.shuffle();
        Ok(loader)
    }

    /// Draws this epoch's order from a copy of `epoch_rng`, so the stored state replays it.
    fn shuffle(&mut self) {
        self.order.sort_unstable();
        let mut rng = self.state.epoch_rng.clone();
        self.order.shuffle(&mut rng);
    }

    pub fn state(&self) -> &LoaderState {
        &self.state
    }

    /// Continues from a checkpoint's `state`, which must be one this loader could have
    /// reached: a cursor a whole number of batches into this split (a tampered one would
    /// index past the split).
    pub fn restore(&mut self, state: LoaderState) -> Result<(), String> {
        if state.cursor > self.order.len() || !state.cursor.is_multiple_of(self.batch) {
            return Err(format!(
                "data cursor {} is not a whole number of batches of {} within the {}                  training items: not a checkpoint of this run's data",
                state.cursor,
                self.batch,
                self.order.len()
            ));
        }
        self.state = state;
        self.shuffle();
        Ok(())
    }

    /// Full batches per epoch (the last partial batch is dropped, so shapes stay fixed).
    pub fn batches_per_epoch(&self) -> usize {
        self.order.len() / self.batch
    }

    pub fn epoch(&self) -> u64 {
        self.state.epoch
    }

    pub fn next_batch(&mut self) -> Result<Batch, TchError> {
        if self.state.cursor + self.batch > self.order.len() {
            self.state.epoch += 1;
            self.state.cursor = 0;
            // The next epoch's RNG continues from this epoch's stream.
            let mut rng = self.state.epoch_rng.clone();
            let _: u64 = rng.gen();
            self.state.epoch_rng = Pcg64::seed_from_u64(rng.gen());
            self.shuffle();
        }
        let picked = &self.order[self.state.cursor..self.state.cursor + self.batch];
        self.state.cursor += self.batch;
        let draw = &mut self.state.draw_rng;
        let rows: Vec<i64> = picked
            .iter()
            .map(|&i| i * self.annotators + draw.gen_range(0..self.annotators))
            .collect();
        let transforms: Vec<u8> = picked
            .iter()
            .map(|_| {
                let flip = self.augment.flips && draw.gen_bool(0.5);
                let turns = if self.augment.rotations {
                    draw.gen_range(0..4u8)
                } else {
                    0
                };
                u8::from(flip) | (turns << 1)
            })
            .collect();
        let to_device = |v: &[i64]| Tensor::f_from_slice(v)?.f_to_device(self.device);
        let images = self.images.f_index_select(0, &to_device(picked)?)?;
        let masks = self
            .masks
            .f_index_select(0, &to_device(&rows)?)?
            .f_to_kind(Kind::Float)?;
        Ok(Batch {
            images: self.transform(images, &transforms)?,
            masks: self.transform(masks, &transforms)?,
        })
    }

    /// Applies each sample's transform (bit 0: flip, bits 1-2: quarter turns), one tensor
    /// op per distinct transform rather than per sample.
    fn transform(&self, xs: Tensor, transforms: &[u8]) -> Result<Tensor, TchError> {
        if transforms.iter().all(|&t| t == 0) {
            return Ok(xs);
        }
        // `index_copy` is out of place, so `xs` itself is never written.
        let mut out = xs.shallow_clone();
        for t in 1..8u8 {
            let rows: Vec<i64> = (0..transforms.len() as i64)
                .filter(|&i| transforms[i as usize] == t)
                .collect();
            if rows.is_empty() {
                continue;
            }
            let rows = Tensor::f_from_slice(&rows)?.f_to_device(self.device)?;
            let mut part = xs.f_index_select(0, &rows)?;
            if t & 1 == 1 {
                part = part.f_flip([3])?;
            }
            if t >> 1 > 0 {
                part = part.f_rot90(i64::from(t >> 1), [2, 3])?;
            }
            out = out.f_index_copy(0, &rows, &part)?;
        }
        Ok(out)
    }
}

/// The items of a split in order, `batch` at a time, with all annotations: for validation
/// and evaluation. Yields (item indices, images `[b, 1, H, W]`, masks u8 `[b, A, H, W]`).
pub fn in_order(
    store: &Store,
    part: SplitName,
    batch: usize,
    device: Device,
) -> impl Iterator<Item = Result<InOrderBatch, TchError>> + '_ {
    store.split(part).chunks(batch.max(1)).map(move |chunk| {
        let index = Tensor::f_from_slice(&chunk.iter().map(|&i| i as i64).collect::<Vec<_>>())?;
        let images = store
            .images
            .f_index_select(0, &index)?
            .f_to_device(device)?;
        let masks = store.masks.f_index_select(0, &index)?.f_to_device(device)?;
        Ok((chunk.to_vec(), images, masks))
    })
}

/// What [`in_order`] yields: item indices, their images and all their masks.
pub type InOrderBatch = (Vec<usize>, Tensor, Tensor);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::prepare::{prepare_synthetic, Outcome, PrepareOptions};
    use crate::data::synthetic::SyntheticConfig;

    fn store(dir: &std::path::Path) -> Store {
        let options = PrepareOptions {
            out: dir.join("syn"),
            force: false,
            split: Default::default(),
            split_seed: 1,
        };
        let config = SyntheticConfig {
            items: 60,
            size: 32,
            annotators: 4,
            seed: 9,
        };
        assert!(matches!(
            prepare_synthetic(config, &options).unwrap(),
            Outcome::Prepared(_)
        ));
        Store::open(&options.out).unwrap()
    }

    #[test]
    fn batches_come_from_the_split_with_one_drawn_annotator_each() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let mut loader = Loader::new(
            &store,
            SplitName::Train,
            4,
            Augment::default(),
            5,
            Device::Cpu,
        )
        .unwrap();
        let train = store.split(SplitName::Train);
        for _ in 0..loader.batches_per_epoch() * 2 {
            let batch = loader.next_batch().unwrap();
            assert_eq!(batch.images.size(), [4, 1, 32, 32]);
            assert_eq!(batch.masks.size(), [4, 1, 32, 32]);
            for b in 0..4 {
                // Find the item by its image and check the mask is one of its annotations.
                let image = batch.images.get(b);
                let item = train
                    .iter()
                    .copied()
                    .find(|&i| store.images.get(i as i64).equal(&image))
                    .expect("the image of a train item");
                let mask = batch.masks.get(b).to_kind(Kind::Uint8);
                let annotations = store.masks.get(item as i64);
                assert!((0..4).any(|a| annotations.get(a).unsqueeze(0).equal(&mask)));
            }
        }
        assert!(loader.epoch() >= 1);
    }

    #[test]
    fn a_restored_state_replays_the_same_batches() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let augment = Augment {
            flips: true,
            rotations: true,
        };
        let mut a = Loader::new(&store, SplitName::Train, 3, augment, 8, Device::Cpu).unwrap();
        for _ in 0..17 {
            a.next_batch().unwrap();
        }
        let saved = a.state().clone();
        let json = serde_json::to_string(&saved).unwrap();
        let expected: Vec<Batch> = (0..20).map(|_| a.next_batch().unwrap()).collect();
        let mut b = Loader::new(&store, SplitName::Train, 3, augment, 999, Device::Cpu).unwrap();
        b.restore(serde_json::from_str(&json).unwrap()).unwrap();
        for e in expected {
            let got = b.next_batch().unwrap();
            assert!(got.images.equal(&e.images) && got.masks.equal(&e.masks));
        }
        // A cursor this loader cannot have reached is refused, not indexed with.
        for cursor in [usize::MAX, 4, 3 * 1024 * 1024] {
            let bad = LoaderState {
                cursor,
                ..saved.clone()
            };
            let err = b.restore(bad).unwrap_err();
            assert!(err.contains(&format!("data cursor {cursor} ")), "{err}");
        }
    }

    #[test]
    fn augmentation_moves_image_and_mask_together() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let augment = Augment {
            flips: true,
            rotations: true,
        };
        let mut loader = Loader::new(&store, SplitName::Train, 8, augment, 2, Device::Cpu).unwrap();
        let (mut seen_transformed, train) = (0, store.split(SplitName::Train));
        // The inverse of transform t for one [1, H, W] sample: unturn, then unflip.
        let undo = |t: i64, x: &Tensor| {
            let x = x.rot90(-(t >> 1), [1, 2]);
            if t & 1 == 1 {
                x.flip([2])
            } else {
                x
            }
        };
        for _ in 0..5 {
            let batch = loader.next_batch().unwrap();
            for b in 0..8 {
                let image = batch.images.get(b);
                // Exactly one undo maps the image back to a stored item, and the same undo
                // maps the mask onto one of that item's annotations.
                let (t, item) = (0..8)
                    .find_map(|t| {
                        let undone = undo(t, &image);
                        train
                            .iter()
                            .find(|&&i| store.images.get(i as i64).equal(&undone))
                            .map(|&i| (t, i))
                    })
                    .expect("an undoable transform");
                if t != 0 {
                    seen_transformed += 1;
                }
                let mask = undo(t, &batch.masks.get(b).to_kind(Kind::Uint8));
                let annotations = store.masks.get(item as i64);
                assert!((0..4).any(|a| annotations.get(a).unsqueeze(0).equal(&mask)));
            }
        }
        assert!(
            seen_transformed > 10,
            "{seen_transformed} of 40 samples transformed"
        );
    }

    #[test]
    fn too_small_a_split_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let err = Loader::new(
            &store,
            SplitName::Val,
            1000,
            Augment::default(),
            1,
            Device::Cpu,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("fewer than a batch of 1000"),
            "{err}"
        );
    }
}

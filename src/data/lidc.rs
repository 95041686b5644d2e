//! Reads the LIDC-IDRI crop file: a pickled dict mapping `<patient>_<slice>` to
//! `{"image": 2-D array, "masks": [2-D array; N], "series_uid": str}`.
//!
//! Parsing checks structure only (keys, fields, shapes, dtypes) and keeps every array as a
//! view into the input; pixel values are checked when they are written out, so the pass
//! over a memory-mapped file does not page in its array data.

use std::collections::{HashMap, HashSet};

use thiserror::Error;

use super::pickle::{
    self, ArrayView, ConvertError, Dtype, ElementType, Pickle, PickleError, Value,
};

/// Masks per item in the published file: one per radiologist.
pub const DEFAULT_MASK_COUNT: usize = 4;

/// Why a file is not a usable LIDC file. Item errors name the item's key.
#[derive(Debug, Error)]
pub enum LidcError {
    #[error(transparent)]
    Pickle(#[from] PickleError),
    #[error("the pickle holds a {found}, not a dict of items")]
    NotADict { found: &'static str },
    #[error("the pickle's dict has no items")]
    Empty,
    #[error("key #{index} is a {found}, not a string")]
    KeyNotString { index: usize, found: &'static str },
    #[error("item {key:?}: key is not of the form <patient>_<slice>")]
    KeyFormat { key: String },
    #[error("item {key:?} appears twice")]
    DuplicateKey { key: String },
    #[error("item {key:?} is a {found}, not a dict")]
    ItemNotDict { key: String, found: &'static str },
    #[error("item {key:?} has no {field:?}")]
    MissingField { key: String, field: &'static str },
    #[error("item {key:?}: {field:?} is a {found}, expected {expected}")]
    FieldType {
        key: String,
        field: &'static str,
        expected: &'static str,
        found: &'static str,
    },
    #[error("item {key:?}: image has shape {shape:?}, expected a non-empty 2-D array")]
    ImageShape { key: String, shape: Vec<usize> },
    #[error("item {key:?}: image dtype {dtype} is not float32 or float64")]
    ImageDtype { key: String, dtype: Dtype },
    #[error("item {key:?} has {found} masks, expected {expected}")]
    MaskCount {
        key: String,
        expected: usize,
        found: usize,
    },
    #[error("item {key:?}: mask {index} is a {found}, not an array")]
    MaskType {
        key: String,
        index: usize,
        found: &'static str,
    },
    #[error("item {key:?}: mask {index} has shape {shape:?} but the image has {image_shape:?}")]
    MaskShape {
        key: String,
        index: usize,
        shape: Vec<usize>,
        image_shape: Vec<usize>,
    },
    #[error(
        "item {key:?}: image shape {shape:?} differs from item {first_key:?}'s {first_shape:?}"
    )]
    ShapeMismatch {
        key: String,
        shape: Vec<usize>,
        first_key: String,
        first_shape: Vec<usize>,
    },
    #[error("item {key:?} reuses the image data of item {first_key:?}")]
    SharedImage { key: String, first_key: String },
    #[error("item {key:?}: image: {source}")]
    Image { key: String, source: ConvertError },
    #[error("item {key:?}: mask {index}: {source}")]
    Mask {
        key: String,
        index: usize,
        source: ConvertError,
    },
    #[error("item {key:?} has no mask {index} (it has {count})")]
    MaskIndex {
        key: String,
        index: usize,
        count: usize,
    },
}

/// One slice: its image and one mask per annotator, all of the image's 2-D shape.
#[derive(Debug, Clone)]
pub struct LidcItem<'a> {
    /// Owned (copied while the parser has the page in hand), so later passes over the
    /// items fault none of the input's pages back in.
    pub key: String,
    /// Text before the key's first '_'; splits must group by it, since a patient's slices
    /// are near-duplicates.
    pub patient: String,
    pub series_uid: Option<String>,
    pub image: ArrayView<'a>,
    pub masks: Vec<ArrayView<'a>>,
}

impl LidcItem<'_> {
    /// Writes the image as f32 in C order; non-finite pixels are an error naming the item.
    pub fn write_image(&self, out: &mut [f32]) -> Result<(), LidcError> {
        self.image
            .write_f32(out)
            .map_err(|source| LidcError::Image {
                key: self.key.to_owned(),
                source,
            })
    }

    /// Writes mask `index` as 0/1 bytes in C order; other values are an error naming it.
    pub fn write_mask(&self, index: usize, out: &mut [u8]) -> Result<(), LidcError> {
        let mask = self.masks.get(index).ok_or_else(|| LidcError::MaskIndex {
            key: self.key.to_owned(),
            index,
            count: self.masks.len(),
        })?;
        mask.write_u8_mask(out).map_err(|source| LidcError::Mask {
            key: self.key.to_owned(),
            index,
            source,
        })
    }
}

/// Parses a LIDC file, keeping the file's item order. Every item must have exactly
/// `expected_masks` masks and all images one shape.
pub fn parse_lidc(bytes: &[u8], expected_masks: usize) -> Result<Vec<LidcItem<'_>>, LidcError> {
    parse_lidc_with_progress(bytes, expected_masks, &mut |_| {})
}

/// `parse_lidc` with a progress callback, as `pickle::parse_with_progress`; after the
/// pickle is parsed, the walk over its items reports its position again from the start.
pub fn parse_lidc_with_progress<'a>(
    bytes: &'a [u8],
    expected_masks: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<LidcItem<'a>>, LidcError> {
    let pickle = pickle::parse_with_progress(bytes, progress)?;
    let root = pickle.root();
    let entries = pickle.as_dict(root).ok_or(LidcError::NotADict {
        found: pickle.kind(root),
    })?;
    if entries.is_empty() {
        return Err(LidcError::Empty);
    }
    let mut keys = HashSet::with_capacity(entries.len());
    // Distinct (and non-empty) images must have distinct data: otherwise a small file could
    // reference one image, or one huge item dict, from countless items and make parsing and
    // every consumer expand it countless times.
    let mut image_owners = HashMap::with_capacity(entries.len());
    let mut items: Vec<LidcItem<'_>> = Vec::with_capacity(entries.len());
    for (index, &(key, value)) in entries.iter().enumerate() {
        let key = pickle.as_str(key).ok_or(LidcError::KeyNotString {
            index,
            found: pickle.kind(key),
        })?;
        // This walk reads every key and field name again: report where it stands too.
        if index % 256 == 0 {
            let at = key.as_ptr() as usize;
            let base = bytes.as_ptr() as usize;
            if (base..base + bytes.len()).contains(&at) {
                progress(at - base);
            }
        }
        let patient = match key.split_once('_') {
            Some((patient, _)) if !patient.is_empty() => patient,
            _ => {
                return Err(LidcError::KeyFormat {
                    key: key.to_owned(),
                })
            }
        };
        if !keys.insert(key) {
            return Err(LidcError::DuplicateKey {
                key: key.to_owned(),
            });
        }
        let item = read_item(&pickle, key, patient, value, expected_masks)?;
        if let Some(first) = items.first() {
            if item.image.shape() != first.image.shape() {
                return Err(LidcError::ShapeMismatch {
                    key: key.to_owned(),
                    shape: item.image.shape().to_vec(),
                    first_key: first.key.to_owned(),
                    first_shape: first.image.shape().to_vec(),
                });
            }
        }
        if let Some(first_key) = image_owners.insert(item.image.data().as_ptr(), key) {
            return Err(LidcError::SharedImage {
                key: key.to_owned(),
                first_key: first_key.to_owned(),
            });
        }
        items.push(item);
    }
    Ok(items)
}

/// Reads one item's dict into an item whose arrays all have the image's shape.
fn read_item<'a>(
    pickle: &Pickle<'a>,
    key: &'a str,
    patient: &'a str,
    value: Value,
    expected_masks: usize,
) -> Result<LidcItem<'a>, LidcError> {
    let reader = ItemReader { pickle, key };
    let fields = reader.fields(value)?;
    let image = reader.image(fields.image)?;
    let masks = reader.masks(fields.masks, image, expected_masks)?;
    let series_uid = reader.series_uid(fields.series_uid)?;
    Ok(LidcItem {
        key: key.to_owned(),
        patient: patient.to_owned(),
        series_uid: series_uid.map(str::to_owned),
        image: image.clone(),
        masks,
    })
}

/// The values of an item's fields, before their types are checked.
struct ItemFields {
    image: Value,
    masks: Value,
    series_uid: Option<Value>,
}

/// Checks the parts of one item's dict; every error it makes names the item's key.
struct ItemReader<'p, 'a> {
    pickle: &'p Pickle<'a>,
    key: &'a str,
}

impl<'p, 'a> ItemReader<'p, 'a> {
    fn missing(&self, field: &'static str) -> LidcError {
        LidcError::MissingField {
            key: self.key.to_owned(),
            field,
        }
    }

    fn wrong_type(&self, field: &'static str, expected: &'static str, value: Value) -> LidcError {
        LidcError::FieldType {
            key: self.key.to_owned(),
            field,
            expected,
            found: self.pickle.kind(value),
        }
    }

    /// The item's `image`, `masks` and optional `series_uid`; other fields are ignored.
    fn fields(&self, value: Value) -> Result<ItemFields, LidcError> {
        let fields = self
            .pickle
            .as_dict(value)
            .ok_or_else(|| LidcError::ItemNotDict {
                key: self.key.to_owned(),
                found: self.pickle.kind(value),
            })?;
        // A repeated field keeps its last value, as a Python dict would.
        let (mut image, mut masks, mut series_uid) = (None, None, None);
        for &(name, field) in fields {
            match self.pickle.as_str(name) {
                Some("image") => image = Some(field),
                Some("masks") => masks = Some(field),
                Some("series_uid") => series_uid = Some(field),
                _ => {}
            }
        }
        Ok(ItemFields {
            image: image.ok_or_else(|| self.missing("image"))?,
            masks: masks.ok_or_else(|| self.missing("masks"))?,
            series_uid,
        })
    }

    /// A non-empty 2-D float array.
    fn image(&self, value: Value) -> Result<&'p ArrayView<'a>, LidcError> {
        let image = self
            .pickle
            .as_array(value)
            .ok_or_else(|| self.wrong_type("image", "a numpy array", value))?;
        if image.shape().len() != 2 || image.is_empty() {
            return Err(LidcError::ImageShape {
                key: self.key.to_owned(),
                shape: image.shape().to_vec(),
            });
        }
        if !matches!(image.dtype().element, ElementType::F4 | ElementType::F8) {
            return Err(LidcError::ImageDtype {
                key: self.key.to_owned(),
                dtype: image.dtype(),
            });
        }
        Ok(image)
    }

    /// Exactly `expected` arrays, each of the image's shape.
    fn masks(
        &self,
        value: Value,
        image: &ArrayView<'_>,
        expected: usize,
    ) -> Result<Vec<ArrayView<'a>>, LidcError> {
        let mask_values = self
            .pickle
            .as_sequence(value)
            .ok_or_else(|| self.wrong_type("masks", "a list of numpy arrays", value))?;
        if mask_values.len() != expected {
            return Err(LidcError::MaskCount {
                key: self.key.to_owned(),
                expected,
                found: mask_values.len(),
            });
        }
        mask_values
            .iter()
            .enumerate()
            .map(|(index, &value)| {
                let mask = self
                    .pickle
                    .as_array(value)
                    .ok_or_else(|| LidcError::MaskType {
                        key: self.key.to_owned(),
                        index,
                        found: self.pickle.kind(value),
                    })?;
                if mask.shape() != image.shape() {
                    return Err(LidcError::MaskShape {
                        key: self.key.to_owned(),
                        index,
                        shape: mask.shape().to_vec(),
                        image_shape: image.shape().to_vec(),
                    });
                }
                Ok(mask.clone())
            })
            .collect()
    }

    /// A string, or nothing when the field is absent or `None`.
    fn series_uid(&self, value: Option<Value>) -> Result<Option<&'a str>, LidcError> {
        match value {
            None | Some(Value::None) => Ok(None),
            Some(value) => self
                .pickle
                .as_str(value)
                .map(Some)
                .ok_or_else(|| self.wrong_type("series_uid", "a string", value)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::pickle::op;
    use crate::data::pickle::testing::{f32_bytes, Writer};

    const SHAPE: [usize; 2] = [2, 2];

    /// Options for one item of a hand-built file.
    struct Item<'k> {
        key: &'k str,
        image: Vec<f32>,
        shape: [usize; 2],
        masks: usize,
        with_image: bool,
        uid: Option<&'k str>,
    }

    fn item(key: &str) -> Item<'_> {
        Item {
            key,
            image: vec![0.0, 0.25, 0.5, 1.0],
            shape: SHAPE,
            masks: 4,
            with_image: true,
            uid: Some("1.2.3"),
        }
    }

    /// A writer at the fields of item "P_1", the file's first: the top-level dict, the
    /// key, the item's dict and the mark its fields' SETITEMS closes.
    fn open_first_item(protocol: u8) -> Writer {
        let mut w = Writer::new(protocol);
        w.op(op::EMPTY_DICT)
            .str("P_1")
            .op(op::EMPTY_DICT)
            .op(op::MARK);
        w
    }

    /// A protocol-4 file of one item, "P_1", whose fields `fields` writes.
    fn one_item(fields: impl FnOnce(&mut Writer)) -> Vec<u8> {
        let mut w = open_first_item(4);
        fields(&mut w);
        w.op(op::SETITEMS).op(op::SETITEM).finish()
    }

    /// The field "image": an all-zero float32 array of `SHAPE`.
    fn zero_image(w: &mut Writer) -> &mut Writer {
        w.str("image")
            .frombuffer(("f4", "<"), &SHAPE, false, &f32_bytes(&[0.0; 4]))
    }

    /// A protocol-5 file; all masks of all items share one memoised all-zero array.
    fn file(items: &[Item<'_>]) -> Vec<u8> {
        let mut w = Writer::new(5);
        w.op(op::EMPTY_DICT);
        let mut zeros = None;
        for item in items {
            w.str(item.key).op(op::EMPTY_DICT).op(op::MARK);
            if item.with_image {
                let n = item.shape.iter().product();
                w.str("image").frombuffer(
                    ("f4", "<"),
                    &item.shape,
                    false,
                    &f32_bytes(&item.image[..n]),
                );
            }
            w.str("masks").op(op::EMPTY_LIST).op(op::MARK);
            for _ in 0..item.masks {
                match zeros {
                    Some(index) => {
                        w.get(index);
                    }
                    None => {
                        w.frombuffer(("u1", "|"), &SHAPE, false, &[0; 4]);
                        zeros = Some(w.put());
                    }
                }
            }
            w.op(op::APPENDS);
            if let Some(uid) = item.uid {
                w.str("series_uid").str(uid);
            }
            w.op(op::SETITEMS).op(op::SETITEM);
        }
        w.finish()
    }

    #[test]
    fn items_in_file_order() {
        let bytes = file(&[
            item("P2_s1"),
            item("P1_s7"),
            Item {
                uid: None,
                ..item("P2_s0")
            },
        ]);
        let items = parse_lidc(&bytes, 4).unwrap();
        let keys: Vec<_> = items
            .iter()
            .map(|i| (i.key.as_str(), i.patient.as_str(), i.series_uid.as_deref()))
            .collect();
        assert_eq!(
            keys,
            [
                ("P2_s1", "P2", Some("1.2.3")),
                ("P1_s7", "P1", Some("1.2.3")),
                ("P2_s0", "P2", None)
            ]
        );
        let mut image = [0.0; 4];
        items[1].write_image(&mut image).unwrap();
        assert_eq!(image, [0.0, 0.25, 0.5, 1.0]);
        let mut mask = [9; 4];
        items[2].write_mask(3, &mut mask).unwrap();
        assert_eq!(mask, [0; 4]);
        assert!(matches!(
            items[2].write_mask(4, &mut mask),
            Err(LidcError::MaskIndex {
                index: 4,
                count: 4,
                ..
            })
        ));
    }

    #[test]
    fn top_level_must_be_a_non_empty_dict() {
        let bytes = Writer::new(4).op(op::EMPTY_LIST).finish();
        assert!(matches!(
            parse_lidc(&bytes, 4),
            Err(LidcError::NotADict { found: "list" })
        ));
        let bytes = Writer::new(4).op(op::EMPTY_DICT).finish();
        assert!(matches!(parse_lidc(&bytes, 4), Err(LidcError::Empty)));
        let bytes = Writer::new(4)
            .op(op::EMPTY_DICT)
            .int(1)
            .op(op::EMPTY_DICT)
            .op(op::SETITEM)
            .finish();
        assert!(matches!(
            parse_lidc(&bytes, 4),
            Err(LidcError::KeyNotString {
                index: 0,
                found: "int"
            })
        ));
    }

    #[test]
    fn key_errors_name_the_key() {
        for key in ["nounderscore", "_slice"] {
            let err = parse_lidc(&file(&[item(key)]), 4).unwrap_err();
            assert!(
                matches!(err, LidcError::KeyFormat { key: ref k } if k == key),
                "{err}"
            );
        }
        let err = parse_lidc(&file(&[item("P_1"), item("P_1")]), 4).unwrap_err();
        assert!(matches!(err, LidcError::DuplicateKey { ref key } if key == "P_1"));
    }

    #[test]
    fn missing_fields_and_mask_counts() {
        let err = parse_lidc(
            &file(&[
                item("P_1"),
                Item {
                    with_image: false,
                    ..item("P_2")
                },
            ]),
            4,
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "item \"P_2\" has no \"image\"");
        let err = parse_lidc(
            &file(&[Item {
                masks: 3,
                ..item("P_3")
            }]),
            4,
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "item \"P_3\" has 3 masks, expected 4");
        assert_eq!(
            parse_lidc(
                &file(&[Item {
                    masks: 3,
                    ..item("P_3")
                }]),
                3
            )
            .unwrap()
            .len(),
            1
        );

        let mut w = Writer::new(4);
        w.op(op::EMPTY_DICT)
            .str("P_1")
            .op(op::EMPTY_DICT)
            .str("image");
        w.frombuffer(("f4", "<"), &SHAPE, false, &f32_bytes(&[0.0; 4]));
        let bytes = w.op(op::SETITEM).op(op::SETITEM).finish();
        let err = parse_lidc(&bytes, 4).unwrap_err();
        assert!(matches!(err, LidcError::MissingField { ref key, field: "masks" } if key == "P_1"));
    }

    #[test]
    fn shapes_must_agree() {
        let wide = Item {
            shape: [1, 4],
            ..item("P_2")
        };
        let err = parse_lidc(&file(&[item("P_1"), wide]), 4).unwrap_err();
        assert_eq!(
            err.to_string(),
            "item \"P_2\": mask 0 has shape [2, 2] but the image has [1, 4]"
        );

        // Shape checks across items need masks of the new shape: build them explicitly.
        let mut w = Writer::new(5);
        w.op(op::EMPTY_DICT);
        for (key, shape) in [("A_1", [2usize, 2]), ("B_1", [1, 4])] {
            w.str(key).op(op::EMPTY_DICT).op(op::MARK).str("image");
            w.frombuffer(("f4", "<"), &shape, false, &f32_bytes(&[0.0; 4]));
            w.str("masks").op(op::EMPTY_LIST).op(op::MARK);
            for _ in 0..4 {
                w.frombuffer(("b1", "|"), &shape, false, &[0; 4]);
            }
            w.op(op::APPENDS).op(op::SETITEMS).op(op::SETITEM);
        }
        let err = parse_lidc(&w.finish(), 4).unwrap_err();
        assert_eq!(
            err.to_string(),
            "item \"B_1\": image shape [1, 4] differs from item \"A_1\"'s [2, 2]"
        );
    }

    #[test]
    fn field_types_are_checked() {
        let bytes = one_item(|w| {
            w.str("image")
                .frombuffer(("u1", "|"), &SHAPE, false, &[0; 4])
                .str("masks")
                .op(op::EMPTY_LIST);
        });
        assert!(matches!(
            parse_lidc(&bytes, 0),
            Err(LidcError::ImageDtype { .. })
        ));

        let bytes = one_item(|w| {
            w.str("image")
                .frombuffer(("f4", "<"), &[4], false, &f32_bytes(&[0.0; 4]))
                .str("masks")
                .op(op::EMPTY_LIST);
        });
        assert!(matches!(
            parse_lidc(&bytes, 0),
            Err(LidcError::ImageShape { .. })
        ));

        let bytes = one_item(|w| {
            w.str("image")
                .frombuffer(("f4", "<"), &[0, 4], false, &[])
                .str("masks")
                .op(op::EMPTY_LIST);
        });
        assert!(matches!(
            parse_lidc(&bytes, 0),
            Err(LidcError::ImageShape { .. })
        ));

        let bytes = one_item(|w| {
            zero_image(w)
                .str("masks")
                .op(op::EMPTY_LIST)
                .op(op::NONE)
                .op(op::APPEND)
                .str("series_uid")
                .int(7);
        });
        assert!(matches!(
            parse_lidc(&bytes, 1),
            Err(LidcError::MaskType {
                index: 0,
                found: "None",
                ..
            })
        ));
        let err = parse_lidc(&bytes, 0).unwrap_err();
        assert!(matches!(
            err,
            LidcError::MaskCount {
                expected: 0,
                found: 1,
                ..
            }
        ));

        let bytes = Writer::new(4)
            .op(op::EMPTY_DICT)
            .str("P_1")
            .op(op::NONE)
            .op(op::SETITEM)
            .finish();
        assert!(matches!(
            parse_lidc(&bytes, 4),
            Err(LidcError::ItemNotDict { found: "None", .. })
        ));
    }

    #[test]
    fn series_uid_must_be_a_string() {
        let bytes = one_item(|w| {
            zero_image(w)
                .str("masks")
                .op(op::EMPTY_LIST)
                .str("series_uid")
                .int(7);
        });
        let err = parse_lidc(&bytes, 0).unwrap_err();
        assert!(matches!(
            err,
            LidcError::FieldType {
                field: "series_uid",
                found: "int",
                ..
            }
        ));
    }

    #[test]
    fn an_image_shared_by_two_items_is_refused() {
        let mut w = open_first_item(4);
        zero_image(&mut w);
        w.str("masks").op(op::EMPTY_LIST).op(op::SETITEMS);
        let shared = w.put();
        w.op(op::SETITEM).str("P_2").get(shared).op(op::SETITEM);
        let err = parse_lidc(&w.finish(), 0).unwrap_err();
        assert!(
            matches!(err, LidcError::SharedImage { ref key, ref first_key } if key == "P_2" && first_key == "P_1")
        );
    }

    #[test]
    fn pixel_errors_name_the_item() {
        let bad = Item {
            image: vec![0.0, f32::INFINITY, 0.0, 0.0],
            ..item("P_9")
        };
        let bytes = file(&[item("P_1"), bad]);
        let items = parse_lidc(&bytes, 4).unwrap();
        let err = items[1].write_image(&mut [0.0; 4]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "item \"P_9\": image: non-finite value inf at [0, 1]"
        );

        let mut w = open_first_item(5);
        zero_image(&mut w);
        w.str("masks").op(op::EMPTY_LIST).op(op::MARK);
        w.frombuffer(("u1", "|"), &SHAPE, false, &[0, 1, 1, 0]);
        w.frombuffer(("u1", "|"), &SHAPE, false, &[0, 0, 0, 255]);
        let bytes = w.op(op::APPENDS).op(op::SETITEMS).op(op::SETITEM).finish();
        let items = parse_lidc(&bytes, 2).unwrap();
        let err = items[0].write_mask(1, &mut [0; 4]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "item \"P_1\": mask 1: value 255 at [1, 1] is neither 0 nor 1"
        );
    }

    #[test]
    fn pickle_errors_pass_through() {
        assert!(matches!(
            parse_lidc(b"not a pickle", 4),
            Err(LidcError::Pickle(PickleError::NotAPickle { .. }))
        ));
    }
}

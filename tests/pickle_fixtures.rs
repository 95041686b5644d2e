//! Reads every fixture written by scripts/make_pickle_fixtures.py and compares it with the
//! JSON beside it: exact values for good files, the exact error for bad ones.

mod common;

use std::path::PathBuf;

use probunet::data::lidc::{parse_lidc, LidcError};
use probunet::data::pickle::{self, ArrayView, ConvertError, MemoryOrder, PickleError};
use serde_json::Value as Json;

fn fixtures() -> Vec<(PathBuf, Vec<u8>, Json)> {
    let dir = common::pickle_fixture("");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "pickle"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 20, "fixtures missing in {}", dir.display());
    paths
        .into_iter()
        .map(|path| {
            let bytes = std::fs::read(&path).unwrap();
            let json = std::fs::read_to_string(path.with_extension("json")).unwrap();
            (path, bytes, serde_json::from_str(&json).unwrap())
        })
        .collect()
}

fn usizes(json: &Json) -> Vec<usize> {
    let items = json.as_array().unwrap();
    items.iter().map(|v| v.as_u64().unwrap() as usize).collect()
}

fn order(view: &ArrayView<'_>) -> &'static str {
    match view.memory_order() {
        MemoryOrder::C => "C",
        MemoryOrder::Fortran => "F",
    }
}

fn floats(view: &ArrayView<'_>) -> Vec<f32> {
    let mut out = vec![f32::NAN; view.len()];
    view.write_f32(&mut out).unwrap();
    out
}

fn mask_bits(view: &ArrayView<'_>) -> String {
    let mut out = vec![9; view.len()];
    view.write_u8_mask(&mut out).unwrap();
    out.iter().map(|&b| char::from(b'0' + b)).collect()
}

#[test]
fn lidc_fixtures_match_numpy() {
    let mut checked = 0;
    for (path, bytes, expected) in fixtures() {
        let Some(expected_items) = expected.get("items") else {
            continue;
        };
        let name = path.display();
        let masks = expected["expected_masks"].as_u64().unwrap() as usize;
        let items = parse_lidc(&bytes, masks).unwrap_or_else(|e| panic!("{name}: {e}"));
        let expected_items = expected_items.as_array().unwrap();
        assert_eq!(items.len(), expected_items.len(), "{name}");
        for (item, want) in items.iter().zip(expected_items) {
            let at = format!("{name} {}", item.key);
            assert_eq!(item.key, want["key"], "{at}");
            assert_eq!(item.patient, want["patient"], "{at}");
            assert_eq!(
                item.series_uid.as_deref(),
                want["series_uid"].as_str(),
                "{at}"
            );
            assert_eq!(item.image.shape(), usizes(&want["shape"]), "{at}");
            assert_eq!(item.image.dtype().to_string(), want["image_dtype"], "{at}");
            assert_eq!(order(&item.image), want["image_order"], "{at}");
            let mut image = vec![f32::NAN; item.image.len()];
            item.write_image(&mut image).unwrap();
            let want_image: Vec<f32> = want["image"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            assert_eq!(image, want_image, "{at}");
            assert_eq!(item.masks.len(), masks, "{at}");
            for (index, mask) in item.masks.iter().enumerate() {
                assert_eq!(
                    mask.dtype().to_string(),
                    want["mask_dtypes"][index],
                    "{at} mask {index}"
                );
                assert_eq!(order(mask), want["mask_orders"][index], "{at} mask {index}");
                let mut bits = vec![9; mask.len()];
                item.write_mask(index, &mut bits).unwrap();
                assert_eq!(
                    bits,
                    mask_bits(mask)
                        .into_bytes()
                        .iter()
                        .map(|b| b - b'0')
                        .collect::<Vec<_>>()
                );
                assert_eq!(mask_bits(mask), want["masks"][index], "{at} mask {index}");
            }
        }
        checked += 1;
    }
    assert_eq!(checked, 7);
}

#[test]
fn array_fixtures_match_numpy() {
    let mut checked = 0;
    for (path, bytes, expected) in fixtures() {
        let Some(arrays) = expected.get("arrays") else {
            continue;
        };
        let name = path.display();
        let parsed = pickle::parse(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        let entries = parsed.as_dict(parsed.root()).unwrap();
        let arrays = arrays.as_object().unwrap();
        assert_eq!(entries.len(), arrays.len(), "{name}");
        for &(key, value) in entries {
            let key = parsed.as_str(key).unwrap();
            let at = format!("{name} {key}");
            let want = &arrays[key];
            if let Some(same) = want.get("same_as") {
                let original = entries
                    .iter()
                    .find(|&&(k, _)| parsed.as_str(k) == same.as_str())
                    .unwrap();
                assert_eq!(
                    value, original.1,
                    "{at}: memo reference must share the array"
                );
                continue;
            }
            let view = parsed.as_array(value).unwrap();
            assert_eq!(view.shape(), usizes(&want["shape"]), "{at}");
            assert_eq!(view.dtype().to_string(), want["dtype"], "{at}");
            assert_eq!(order(view), want["order"], "{at}");
            let values: Vec<f64> = want["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            let got: Vec<f64> = match view.dtype().element {
                pickle::ElementType::F4 | pickle::ElementType::F8 => {
                    floats(view).into_iter().map(f64::from).collect()
                }
                pickle::ElementType::U1 | pickle::ElementType::B1 => mask_bits(view)
                    .bytes()
                    .map(|b| f64::from(b - b'0'))
                    .collect(),
            };
            assert_eq!(got, values, "{at}");
        }
        checked += 1;
    }
    assert_eq!(checked, 3);
}

fn text(json: &Json, field: &str) -> String {
    json[field].as_str().unwrap().to_owned()
}

fn number(json: &Json, field: &str) -> usize {
    json[field].as_u64().unwrap() as usize
}

/// Parses a bad fixture and, where parsing succeeds, writes every array, returning the
/// first error.
fn first_error(bytes: &[u8]) -> LidcError {
    let items = match parse_lidc(bytes, 4) {
        Ok(items) => items,
        Err(err) => return err,
    };
    for item in &items {
        let mut image = vec![0.0; item.image.len()];
        if let Err(err) = item.write_image(&mut image) {
            return err;
        }
        for (index, mask) in item.masks.iter().enumerate() {
            let mut out = vec![0; mask.len()];
            if let Err(err) = item.write_mask(index, &mut out) {
                return err;
            }
        }
    }
    panic!("no error")
}

#[test]
fn bad_fixtures_give_the_right_error() {
    let mut checked = 0;
    for (path, bytes, want) in fixtures() {
        let Some(kind) = want.get("error").and_then(Json::as_str) else {
            continue;
        };
        let err = first_error(&bytes);
        let message = format!("{}: {err}", path.display());
        let matched = match (kind, &err) {
            ("Truncated", LidcError::Pickle(PickleError::Truncated { offset })) => {
                *offset == number(&want, "offset")
            }
            ("NotAPickle", LidcError::Pickle(PickleError::NotAPickle { found })) => {
                usize::from(*found) == number(&want, "found")
            }
            (
                "ForbiddenGlobal",
                LidcError::Pickle(PickleError::ForbiddenGlobal {
                    offset,
                    module,
                    name,
                }),
            ) => {
                *offset == number(&want, "offset")
                    && *module == text(&want, "module")
                    && *name == text(&want, "name")
                    && err
                        .to_string()
                        .contains(&format!("{module}.{name} at byte {offset}"))
            }
            ("NotADict", LidcError::NotADict { found }) => *found == text(&want, "found"),
            ("Empty", LidcError::Empty) => true,
            ("MissingField", LidcError::MissingField { key, field }) => {
                *key == text(&want, "key") && *field == text(&want, "field")
            }
            (
                "MaskCount",
                LidcError::MaskCount {
                    key,
                    expected,
                    found,
                },
            ) => {
                *key == text(&want, "key")
                    && *expected == number(&want, "expected")
                    && *found == number(&want, "found")
            }
            (
                "ShapeMismatch",
                LidcError::ShapeMismatch {
                    key,
                    shape,
                    first_key,
                    first_shape,
                },
            ) => {
                *key == text(&want, "key")
                    && *shape == usizes(&want["shape"])
                    && *first_key == text(&want, "first_key")
                    && *first_shape == usizes(&want["first_shape"])
            }
            (
                "NonFinite",
                LidcError::Image {
                    key,
                    source: ConvertError::NonFinite { position, value },
                },
            ) => {
                *key == text(&want, "key")
                    && *position == usizes(&want["position"])
                    && value.is_nan()
            }
            (
                "NotBinary",
                LidcError::Mask {
                    key,
                    index,
                    source: ConvertError::NotBinary { position, value },
                },
            ) => {
                *key == text(&want, "key")
                    && *index == number(&want, "mask")
                    && *position == usizes(&want["position"])
                    && Some(*value) == want["value"].as_f64()
            }
            _ => false,
        };
        assert!(matched, "{message}\nexpected {want}");
        if let Some(key) = want.get("key").and_then(Json::as_str) {
            assert!(
                err.to_string().contains(key),
                "{message} does not name {key}"
            );
        }
        checked += 1;
    }
    assert_eq!(checked, 11);
}

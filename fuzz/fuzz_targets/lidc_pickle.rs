//! Feeds arbitrary bytes to the pickle reader and the LIDC layer, and converts every array
//! they accept, so that panics, over-allocation and slow paths anywhere in that code
//! surface as crashes, OOMs or timeouts.
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use probunet::data::lidc::{parse_lidc, DEFAULT_MASK_COUNT};
use probunet::data::pickle::{self, Pickle, Value};

/// Converts each distinct array at the root or one level below it; distinct, so the
/// harness's own work stays linear when the memo references one array many times.
fn convert_reachable(pickle: &Pickle<'_>) {
    let root = pickle.root();
    let children: Vec<Value> = match (pickle.as_dict(root), pickle.as_sequence(root)) {
        (Some(entries), _) => entries.iter().map(|&(_, value)| value).collect(),
        (_, Some(items)) => items.to_vec(),
        _ => Vec::new(),
    };
    let mut seen = HashSet::new();
    for value in std::iter::once(root).chain(children) {
        let (Value::Object(id), Some(array)) = (value, pickle.as_array(value)) else {
            continue;
        };
        if seen.insert(id) {
            let _ = array.write_f32(&mut vec![0.0; array.len()]);
            let _ = array.write_u8_mask(&mut vec![0; array.len()]);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(parsed) = pickle::parse(data) {
        convert_reachable(&parsed);
    }
    if let Ok(items) = parse_lidc(data, DEFAULT_MASK_COUNT) {
        for item in &items {
            let _ = item.write_image(&mut vec![0.0; item.image.len()]);
            for (index, mask) in item.masks.iter().enumerate() {
                let _ = item.write_mask(index, &mut vec![0; mask.len()]);
            }
        }
    }
});

//! Your own data end to end, as the README's "Your own data" shows it: a folder of PNGs
//! with two annotators and uneven patients, prepared (patients from a regex), trained a
//! few steps, predicted on new PNGs; and every kind of bad input refused by name with
//! nothing half-written.
use std::path::{Path, PathBuf};

mod common;
use common::{run_err, run_ok, stderr, stdout};

const SIDE: u32 = 32;

/// A square 8-bit PNG of `side` pixels.
fn write_png(path: &Path, color: png::ColorType, data: &[u8], side: u32) {
    common::write_png(path, side, side, color, png::BitDepth::Eight, data);
}

/// A blob of radius `r` at `(cx, cy)` as 0/255 pixels.
fn blob(cx: f32, cy: f32, r: f32) -> Vec<u8> {
    (0..SIDE * SIDE)
        .map(|i| {
            let (x, y) = ((i % SIDE) as f32 - cx, (i / SIDE) as f32 - cy);
            if x * x + y * y < r * r {
                255
            } else {
                0
            }
        })
        .collect()
}

/// `images/P<p>_s<k>.png` and `masks/{alice,bob}/...`: 6 patients with 1 to 6 slices each.
fn dataset(root: &Path) -> Vec<String> {
    let mut ids = Vec::new();
    for p in 0..6u32 {
        for k in 0..=p {
            let id = format!("P{p}_s{k}");
            let (cx, cy) = (10.0 + 2.0 * p as f32, 12.0 + k as f32);
            let image: Vec<u8> = blob(cx, cy, 6.0).iter().map(|&v| 40 + v / 2).collect();
            write_png(
                &root.join(format!("images/{id}.png")),
                png::ColorType::Grayscale,
                &image,
                SIDE,
            );
            write_png(
                &root.join(format!("masks/alice/{id}.png")),
                png::ColorType::Grayscale,
                &blob(cx, cy, 5.0),
                SIDE,
            );
            write_png(
                &root.join(format!("masks/bob/{id}.png")),
                png::ColorType::Grayscale,
                &blob(cx, cy, 7.0),
                SIDE,
            );
            ids.push(id);
        }
    }
    ids
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn own_pngs_prepare_train_and_predict() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("mydata");
    let ids = dataset(&data);
    let out = run_ok(
        dir.path(),
        &[
            "prepare",
            "mydata",
            "--patient-regex",
            r"^(P\d+)_",
            "--split",
            "50,25,25",
        ],
    );
    assert!(
        stdout(&out).contains("items: 21, patients: 6"),
        "{}",
        stdout(&out)
    );
    let manifest = common::read_json(&dir.path().join("data/mydata/manifest.json"));
    assert_eq!(manifest["shape"]["annotators"], 2);
    assert!(
        manifest["image_scaling"]
            .as_str()
            .unwrap()
            .contains("16-bit / 65535"),
        "{manifest}"
    );
    assert_eq!(manifest["shape"]["height"], SIDE);
    assert_eq!(manifest["keys"].as_array().unwrap().len(), ids.len());
    assert_eq!(
        manifest["source"]["annotators"],
        serde_json::json!(["alice", "bob"])
    );
    // The split is by patient: no patient in two parts.
    let patients = manifest["patients"].as_array().unwrap();
    let part_of = |part: &str| -> std::collections::BTreeSet<String> {
        manifest["split"][part]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                patients[i.as_u64().unwrap() as usize]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    let (train, val, test) = (part_of("train"), part_of("val"), part_of("test"));
    assert!(train.is_disjoint(&val) && train.is_disjoint(&test) && val.is_disjoint(&test));
    assert_eq!(train.len() + val.len() + test.len(), 6);
    // Running it again finds the same store.
    let again = run_ok(
        dir.path(),
        &[
            "prepare",
            "mydata",
            "--patient-regex",
            r"^(P\d+)_",
            "--split",
            "50,25,25",
        ],
    );
    assert!(
        common::text(&again).contains("already"),
        "{}",
        common::text(&again)
    );

    let spec = dir.path().join("mine.toml");
    std::fs::write(
        &spec,
        "name = \"mine\"\n[data]\nstore = \"data/mydata\"\n[model]\nfilters = [8, 16]\n\
         reconstruction = \"batch_mean\"\n[train]\nbatch = 2\nsteps = 10\nval_every = 10\n\
         val_samples = 4\ncheckpoint_every = 10\ndevice = \"cpu\"\n",
    )
    .unwrap();
    run_ok(dir.path(), &["train", spec.to_str().unwrap()]);
    let run = common::only_run(dir.path());
    let new = dir.path().join("new");
    write_png(
        &new.join("fresh.png"),
        png::ColorType::Grayscale,
        &blob(16.0, 16.0, 6.0),
        SIDE,
    );
    let out = dir.path().join("pred");
    run_ok(
        dir.path(),
        &[
            "predict",
            run.to_str().unwrap(),
            new.to_str().unwrap(),
            "store:test",
            "--out",
            out.to_str().unwrap(),
            "--samples",
            "3",
        ],
    );
    let fresh = out.join("fresh");
    for file in ["samples.npy", "mean.png", "variance.png", "overview.png"] {
        assert!(fresh.join(file).is_file(), "{file}");
    }
    let index = common::read_json(&out.join("index.json"));
    assert!(index["images"].as_array().unwrap().len() > 1, "{index}");
}

/// `prepare` on `root` fails, names `needle`, and leaves no store or partial folder.
fn refused(dir: &Path, root: &str, extra: &[&str], needle: &str) {
    let mut args = vec!["prepare", root, "--out", "data/bad"];
    args.extend(extra);
    let out = run_err(dir, &args);
    let err = stderr(&out);
    assert!(err.contains(needle), "{root}: {err}");
    assert_eq!(err.matches("error:").count(), 1, "{err}");
    assert_eq!(
        entries(&dir.join("data")),
        Vec::<String>::new(),
        "{root}: {err}"
    );
}

#[test]
fn bad_own_data_is_refused_by_name_with_nothing_half_written() {
    let dir = tempfile::tempdir().unwrap();
    let copy = |name: &str| -> PathBuf {
        let root = dir.path().join(name);
        dataset(&root);
        root
    };
    let grey = png::ColorType::Grayscale;

    let root = copy("truncated");
    let image = root.join("images/P3_s1.png");
    let bytes = std::fs::read(&image).unwrap();
    std::fs::write(&image, &bytes[..bytes.len() / 2]).unwrap();
    refused(
        dir.path(),
        "truncated",
        &[],
        "P3_s1.png: not a readable PNG",
    );

    let root = copy("colour");
    write_png(
        &root.join("images/P2_s0.png"),
        png::ColorType::Rgb,
        &vec![9; (SIDE * SIDE * 3) as usize],
        SIDE,
    );
    refused(
        dir.path(),
        "colour",
        &[],
        "P2_s0.png: is Rgb, not greyscale",
    );

    let root = copy("sizes");
    write_png(
        &root.join("masks/bob/P4_s2.png"),
        grey,
        &vec![0; 16 * 16],
        16,
    );
    refused(
        dir.path(),
        "sizes",
        &[],
        "P4_s2.png: is 16x16 (height x width) but",
    );

    let root = copy("missing");
    std::fs::remove_file(root.join("masks/alice/P5_s3.png")).unwrap();
    refused(dir.path(), "missing", &[], "image P5_s3: no mask");
    refused(
        dir.path(),
        "missing",
        &["--patient-regex", "^(Q)"],
        "does not match --patient-regex",
    );
    // With --missing empty the absent mask is background, and the store is made.
    run_ok(
        dir.path(),
        &[
            "prepare",
            "missing",
            "--missing",
            "empty",
            "--out",
            "data/ok",
        ],
    );
    std::fs::remove_dir_all(dir.path().join("data/ok")).unwrap();

    let root = copy("listed");
    std::fs::write(
        root.join("list.csv"),
        "image,mask_0,mask_1,patient\nimages/P0_s0.png,masks/alice/P0_s0.png,masks/bob/P0_s0.png,A\n\
         images/P1_s0.png,masks/alice/nothere.png,masks/bob/P1_s0.png,B\n",
    )
    .unwrap();
    refused(dir.path(), "listed/list.csv", &[], "line 3 (mask_0): mask");
    // A folder where a file belongs, and a short row, each said once in words.
    std::fs::write(
        root.join("list.csv"),
        "image,mask_0,mask_1\nimages,masks/alice/P0_s0.png,masks/bob/P0_s0.png\n",
    )
    .unwrap();
    let folder = "line 2: image ";
    refused(dir.path(), "listed/list.csv", &[], folder);
    refused(
        dir.path(),
        "listed/list.csv",
        &[],
        "images is a folder, not a file",
    );
    std::fs::write(
        root.join("list.csv"),
        "image,mask_0,mask_1\nimages/P0_s0.png\n",
    )
    .unwrap();
    let short = "list.csv: line 2: has 1 fields, the header 3";
    refused(dir.path(), "listed/list.csv", &[], short);
}

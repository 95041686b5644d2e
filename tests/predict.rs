//! `probunet predict` as a user runs it: a trained run's samples for PNG and `.npy` files,
//! folders and its own store's split; outputs checked for shape, range and determinism
//! across `--batch`; bad inputs named while the rest go through, nothing half-written.
use std::path::{Path, PathBuf};

mod common;
use common::{only_run, run_err, run_ok, stderr, stdout, write_png};

/// A disc of brightness on a dark background, 8-bit, `side` pixels.
fn disc(side: u32, radius: f32) -> Vec<u8> {
    let c = side as f32 / 2.0;
    (0..side * side)
        .map(|i| {
            let (x, y) = ((i % side) as f32 - c, (i / side) as f32 - c);
            if x * x + y * y < radius * radius {
                220
            } else {
                30
            }
        })
        .collect()
}

fn npy_f32(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let array = probunet::predict::npy::parse(&std::fs::read(path).unwrap()).unwrap();
    (array.shape, array.values)
}

fn trained(dir: &Path) -> PathBuf {
    let spec = common::write_spec(dir, "");
    run_ok(
        dir,
        &["train", spec.to_str().unwrap(), "--set", "train.steps=20"],
    );
    only_run(dir)
}

#[test]
fn predicts_files_folders_and_the_store_the_same_whatever_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let run = trained(dir.path());
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    let grey = png::ColorType::Grayscale;
    write_png(
        &images.join("disc.png"),
        32,
        32,
        grey,
        png::BitDepth::Eight,
        &disc(32, 8.0),
    );
    let sixteen: Vec<u8> = disc(32, 5.0)
        .iter()
        .flat_map(|&v| (u16::from(v) * 257).to_be_bytes())
        .collect();
    write_png(
        &images.join("deep.png"),
        32,
        32,
        grey,
        png::BitDepth::Sixteen,
        &sixteen,
    );
    let mut npy = Vec::new();
    let values: Vec<f32> = disc(32, 11.0)
        .iter()
        .map(|&v| f32::from(v) / 255.0)
        .collect();
    probunet::predict::npy::write_f32(&mut npy, &[32, 32], &values).unwrap();
    std::fs::write(images.join("array.npy"), npy).unwrap();

    let predict = |out: &str, batch: &str| {
        let args = [
            "predict",
            run.to_str().unwrap(),
            images.to_str().unwrap(),
            "store:test",
            "--samples",
            "5",
            "--batch",
            batch,
            "--out",
            out,
            "--seed",
            "3",
        ];
        run_ok(dir.path(), &args)
    };
    let one = predict("by-one", "1");
    predict("by-three", "3");
    assert!(stdout(&one).contains("wrote "), "{}", stdout(&one));

    let index = common::read_json(&dir.path().join("by-one/index.json"));
    let records = index["images"].as_array().unwrap();
    let tests = records
        .iter()
        .filter(|r| r["input"].as_str().unwrap().starts_with("store:test/"))
        .count();
    assert!(tests > 0 && records.len() == 3 + tests, "{index}");
    assert_eq!(index["failed"], serde_json::json!([]));
    for record in records {
        let out = PathBuf::from(record["output"].as_str().unwrap());
        let name = out.file_name().unwrap();
        let (shape, samples) = npy_f32(&out.join("samples.npy"));
        assert_eq!(shape, [5, 32, 32]);
        assert!(
            samples.iter().all(|p| (0.0..=1.0).contains(p)),
            "probabilities in [0, 1]"
        );
        let (_, mean) = npy_f32(&out.join("mean.npy"));
        let (_, variance) = npy_f32(&out.join("variance.npy"));
        let expected: f32 = (0..5).map(|s| samples[s * 1024]).sum::<f32>() / 5.0;
        assert!((mean[0] - expected).abs() < 1e-6);
        assert!(variance.iter().all(|v| (0.0..=0.25 + 1e-6).contains(v)));
        for file in [
            "sample-00.png",
            "sample-04.png",
            "mean.png",
            "variance.png",
            "overview.png",
            "prediction.json",
        ] {
            assert!(out.join(file).is_file(), "{file} in {}", out.display());
        }
        // The same noise for the same input whatever the batch: equal up to the float
        // rounding of batched convolutions.
        let other = npy_f32(&dir.path().join("by-three").join(name).join("samples.npy")).1;
        let most = other
            .iter()
            .zip(&samples)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(most < 1e-4, "{}: differs by {most}", name.to_string_lossy());
        let fraction = record["foreground_fraction"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&fraction));
    }
    let csv = std::fs::read_to_string(dir.path().join("by-one/index.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + records.len());
    assert!(csv.starts_with(
        "input,output,height,width,samples,foreground_fraction,mean_pairwise_iou,error"
    ));
}

#[test]
fn bad_inputs_are_named_the_rest_go_through_and_nothing_is_half_written() {
    let dir = tempfile::tempdir().unwrap();
    let run = trained(dir.path());
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    let grey = png::ColorType::Grayscale;
    write_png(
        &images.join("good.png"),
        32,
        32,
        grey,
        png::BitDepth::Eight,
        &disc(32, 8.0),
    );
    write_png(
        &images.join("colour.png"),
        32,
        32,
        png::ColorType::Rgb,
        png::BitDepth::Eight,
        &[9; 32 * 32 * 3],
    );
    write_png(
        &images.join("odd.png"),
        33,
        31,
        grey,
        png::BitDepth::Eight,
        &[0; 33 * 31],
    );
    let good = std::fs::read(images.join("good.png")).unwrap();
    std::fs::write(images.join("cut.png"), &good[..good.len() / 2]).unwrap();
    let out = dir.path().join("out");
    let args = [
        "predict",
        run.to_str().unwrap(),
        images.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--samples",
        "3",
    ];
    let failed = run_err(dir.path(), &args);
    let err = stderr(&failed);
    assert!(err.contains("colour.png: is Rgb, not greyscale"), "{err}");
    assert!(err.contains("cut.png: not a readable PNG"), "{err}");
    assert!(
        err.contains("odd.png: is 31x33 pixels; this model takes sides that are multiples of 2"),
        "{err}"
    );
    assert!(
        err.contains("error: 3 of 4 input(s) could not be predicted"),
        "{err}"
    );
    let mut written: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    written.sort();
    assert_eq!(
        written,
        ["good", "index.csv", "index.json"],
        "no partial folder left"
    );
    let index = common::read_json(&out.join("index.json"));
    assert_eq!(index["failed"].as_array().unwrap().len(), 3);

    // What a killed predict left half-written goes; a live process's stays.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let killed = out.join(format!(".odd.partial-{}", child.id()));
    child.wait().unwrap();
    std::fs::create_dir(&killed).unwrap();
    std::fs::write(killed.join("samples.npy"), "half").unwrap();
    let live = out.join(format!(".odd.partial-{}", std::process::id()));
    std::fs::create_dir(&live).unwrap();

    // --pad takes the odd size, and the outputs have the input's.
    let odd = images.join("odd.png");
    let args = [
        "predict",
        run.to_str().unwrap(),
        odd.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--pad",
        "--samples",
        "2",
    ];
    run_ok(dir.path(), &args);
    assert_eq!(npy_f32(&out.join("odd/samples.npy")).0, [2, 31, 33]);
    assert!(!killed.exists() && live.is_dir());
    std::fs::remove_dir(&live).unwrap();

    // A folder predict did not write is never replaced; nor is a foreign index.json.
    std::fs::remove_dir_all(out.join("good")).unwrap();
    std::fs::create_dir(out.join("good")).unwrap();
    std::fs::write(out.join("good/notes.txt"), "mine").unwrap();
    let good = images.join("good.png");
    let args = [
        "predict",
        run.to_str().unwrap(),
        good.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    let refused = run_err(dir.path(), &args);
    assert!(
        stderr(&refused).contains("was not written by probunet predict; refusing to replace it"),
        "{}",
        stderr(&refused)
    );
    assert_eq!(
        std::fs::read_to_string(out.join("good/notes.txt")).unwrap(),
        "mine"
    );
    let foreign = dir.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("index.json"), "{}").unwrap();
    let args = [
        "predict",
        run.to_str().unwrap(),
        good.to_str().unwrap(),
        "--out",
        foreign.to_str().unwrap(),
    ];
    let refused = run_err(dir.path(), &args);
    assert!(
        stderr(&refused).contains("index.json exists and was not written by probunet predict"),
        "{}",
        stderr(&refused)
    );
    // An --out that is a file is said to be one.
    let file = dir.path().join("afile");
    std::fs::write(&file, "mine").unwrap();
    let mut into_file = args;
    into_file[4] = file.to_str().unwrap();
    let refused = run_err(dir.path(), &into_file);
    let want = format!("--out {}: is a file, not a folder", file.display());
    assert!(stderr(&refused).contains(&want), "{}", stderr(&refused));
    // Nor an index.csv without predict's index.json beside it.
    std::fs::remove_file(foreign.join("index.json")).unwrap();
    std::fs::write(foreign.join("index.csv"), "mine\n").unwrap();
    let refused = run_err(dir.path(), &args);
    assert!(
        stderr(&refused).contains("index.csv exists and was not written by probunet predict"),
        "{}",
        stderr(&refused)
    );
    assert_eq!(
        std::fs::read_to_string(foreign.join("index.csv")).unwrap(),
        "mine\n"
    );
    let missing = run_err(
        dir.path(),
        &["predict", run.to_str().unwrap(), "nothere.png"],
    );
    assert!(
        stderr(&missing).contains("nothere.png: no such file or folder"),
        "{}",
        stderr(&missing)
    );
}

/// Images of one size that memory cannot hold together are sampled one at a time, with
/// the samples they would have had together; an image memory cannot hold alone is named
/// and the others still go through. (25 MiB holds one 256x256 image at 3 samples, not two,
/// nor one of 512x512: the tiny model's formula in `ModelConfig::check_sampling`.)
#[test]
fn an_image_too_large_for_memory_is_named_and_the_rest_go_through() {
    let dir = tempfile::tempdir().unwrap();
    let run = trained(dir.path());
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    let grey = png::ColorType::Grayscale;
    for (name, side) in [("a", 256), ("b", 256), ("big", 512)] {
        let pixels = disc(side, side as f32 / 4.0);
        let path = images.join(format!("{name}.png"));
        write_png(&path, side, side, grey, png::BitDepth::Eight, &pixels);
    }
    let predict = |out: &str, limit: Option<&str>| {
        let args = [
            "predict",
            run.to_str().unwrap(),
            images.to_str().unwrap(),
            "--out",
            out,
            "--samples",
            "3",
        ];
        let mut cmd = common::probunet(dir.path(), &args);
        if let Some(mib) = limit {
            cmd.env("PROBUNET_MEMORY_LIMIT_MIB", mib);
        }
        common::output(&mut cmd)
    };
    let free = predict("free", None);
    assert!(free.status.success(), "{}", stderr(&free));
    let limited = predict("limited", Some("25"));
    let err = stderr(&limited);
    assert!(!limited.status.success(), "{err}");
    assert!(
        err.contains("big.png: is 512x512 pixels: --samples 3 of it needs about 41"),
        "{err}"
    );
    assert!(
        err.contains("error: 1 of 3 input(s) could not be predicted"),
        "{err}"
    );
    for name in ["a", "b"] {
        let samples = format!("{name}/samples.npy");
        assert_eq!(
            npy_f32(&dir.path().join("limited").join(&samples)),
            npy_f32(&dir.path().join("free").join(&samples)),
            "{name}"
        );
    }
    assert!(!dir.path().join("limited/big").exists());
}

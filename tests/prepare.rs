//! `probunet prepare` as a user runs it: pickles into stores, the synthetic dataset, and
//! every kind of bad input refused with nothing left behind.
mod common;

use common::{pickle_fixture as fixture, run_err, run_ok, stderr, stdout};
use probunet::data::split::SplitName;
use probunet::data::store::{Store, ARRAYS_FILE};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The folder holds nothing but what `keep` names (no store, no partial folder).
fn assert_only(dir: &Path, keep: &[&str]) {
    let mut left: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.retain(|n| !keep.contains(&n.as_str()));
    assert!(
        left.is_empty(),
        "left behind in {}: {left:?}",
        dir.display()
    );
}

#[test]
fn every_good_fixture_prepares_to_numpys_values() {
    let dir = tempfile::tempdir().unwrap();
    let good: Vec<PathBuf> = std::fs::read_dir(fixture(""))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with("lidc_") && name.ends_with(".pickle")
        })
        .collect();
    assert!(good.len() >= 6, "fixtures: {good:?}");
    for pickle in good {
        let out_dir = dir.path().join(pickle.file_stem().unwrap());
        let out = run_ok(
            dir.path(),
            &[
                "prepare".as_ref(),
                pickle.as_os_str(),
                "--out".as_ref(),
                out_dir.as_os_str(),
            ],
        );
        assert!(stdout(&out).contains("MB/s"), "{}", stdout(&out));
        common::run_script("check_store.py", &[out_dir.as_os_str(), pickle.as_os_str()]);
    }
}

#[test]
fn a_second_prepare_does_nothing_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("store");
    let pickle = fixture("lidc_p4_np2.pickle");
    let args: [&OsStr; 4] = [
        "prepare".as_ref(),
        pickle.as_os_str(),
        "--out".as_ref(),
        out_dir.as_os_str(),
    ];
    run_ok(dir.path(), &args);
    let before = std::fs::metadata(out_dir.join("data.safetensors"))
        .unwrap()
        .modified()
        .unwrap();
    let again = run_ok(dir.path(), &args);
    assert!(
        stdout(&again).contains("already prepared"),
        "{}",
        stdout(&again)
    );
    assert_eq!(
        std::fs::metadata(out_dir.join("data.safetensors"))
            .unwrap()
            .modified()
            .unwrap(),
        before
    );
    let forced = run_ok(dir.path(), &[&args[..], &["--force".as_ref()]].concat());
    assert!(stdout(&forced).contains("prepared"), "{}", stdout(&forced));
    // Another input into the same folder needs --force.
    let other = fixture("lidc_p2_np1.pickle");
    let out = run_err(
        dir.path(),
        &[
            "prepare".as_ref(),
            other.as_os_str(),
            "--out".as_ref(),
            out_dir.as_os_str(),
        ],
    );
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
}

#[test]
fn a_folder_of_pickles_is_merged_in_name_order() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = dir.path().join("inputs");
    std::fs::create_dir(&inputs).unwrap();
    // Two files with distinct keys: protocol 4 and protocol 5 variants of one dataset
    // share keys, so take one LIDC fixture and a renamed-key copy made by Python.
    let a = inputs.join("a.pickle");
    let b = inputs.join("b.pickle");
    std::fs::copy(fixture("lidc_p4_np2.pickle"), &a).unwrap();
    let script = format!(
        "import pickle; d = pickle.load(open({a:?}, 'rb')); \
         pickle.dump({{'Z' + k: v for k, v in d.items()}}, open({b:?}, 'wb'), protocol=5)",
        a = a.display().to_string(),
        b = b.display().to_string()
    );
    let status = Command::new(common::python())
        .args(["-c", &script])
        .status()
        .unwrap();
    assert!(status.success());
    let out_dir = dir.path().join("merged");
    run_ok(
        dir.path(),
        &[
            "prepare".as_ref(),
            inputs.as_os_str(),
            "--out".as_ref(),
            out_dir.as_os_str(),
        ],
    );
    common::run_script(
        "check_store.py",
        &[out_dir.as_os_str(), a.as_os_str(), b.as_os_str()],
    );
    // The same key in two files is refused, naming both.
    std::fs::copy(&a, inputs.join("c.pickle")).unwrap();
    let out = run_err(
        dir.path(),
        &[
            "prepare".as_ref(),
            inputs.as_os_str(),
            "--out".as_ref(),
            dir.path().join("dup").as_os_str(),
        ],
    );
    let err = stderr(&out);
    assert!(
        err.contains("c.pickle") && err.contains("a.pickle"),
        "{err}"
    );
}

#[test]
fn bad_inputs_are_refused_naming_file_and_item_and_leave_nothing() {
    let cases = [
        ("bad_truncated.pickle", "truncated"),
        ("bad_not_a_pickle.pickle", "bad_not_a_pickle.pickle"),
        ("bad_top_list.pickle", "not a dict"),
        ("bad_empty_dict.pickle", "no items"),
        ("bad_no_masks.pickle", "\"masks\""),
        ("bad_three_masks.pickle", "3 masks"),
        ("bad_mixed_shapes.pickle", "shape"),
        ("bad_nan_pixel.pickle", "item"),
        ("bad_forbidden_global.pickle", "os"),
        ("bad_non_binary_mask.pickle", "mask"),
    ];
    for (name, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        let pickle = fixture(name);
        let out_dir = dir.path().join("store");
        let out = run_err(
            dir.path(),
            &[
                "prepare".as_ref(),
                pickle.as_os_str(),
                "--out".as_ref(),
                out_dir.as_os_str(),
            ],
        );
        let err = stderr(&out);
        assert!(
            err.contains(name),
            "{name}: the error names the file: {err}"
        );
        assert!(
            err.contains(expected),
            "{name}: expected {expected:?} in: {err}"
        );
        assert_only(dir.path(), &[]);
    }
}

#[test]
fn a_missing_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_err(
        dir.path(),
        &[
            "prepare".as_ref(),
            "/nonexistent/data_lidc.pickle".as_ref(),
            "--out".as_ref(),
            dir.path().join("x").as_os_str(),
        ],
    );
    assert!(
        stderr(&out).contains("/nonexistent/data_lidc.pickle"),
        "{}",
        stderr(&out)
    );
    assert_only(dir.path(), &[]);
}

#[test]
fn the_synthetic_dataset_prepares_with_its_ideal_reference() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("syn");
    let args = [
        "prepare",
        "--synthetic",
        "--items",
        "80",
        "--size",
        "32",
        "--out",
    ];
    let mut argv: Vec<&OsStr> = args.iter().map(|a| a.as_ref()).collect();
    argv.push(out_dir.as_os_str());
    let out = run_ok(dir.path(), &argv);
    let text = stdout(&out);
    for needle in [
        "items: 80",
        "train:",
        "val:",
        "test:",
        "ideal-model GED",
        "empty masks per annotator",
    ] {
        assert!(text.contains(needle), "{needle} in {text}");
    }
    let store = Store::open(&out_dir).unwrap();
    assert_eq!(store.images.size(), [80, 1, 32, 32]);
    assert_eq!(store.masks.size(), [80, 4, 32, 32]);
    let ideal = store.manifest.ideal.as_ref().unwrap();
    assert!(ideal.ged_val > 0.0 && ideal.ged_val < 0.5, "{ideal:?}");
    assert!(!store.split(SplitName::Val).is_empty());
    let again = run_ok(dir.path(), &argv);
    assert!(
        stdout(&again).contains("already prepared"),
        "{}",
        stdout(&again)
    );
    let out = run_err(
        dir.path(),
        &[
            "prepare".as_ref(),
            "--synthetic".as_ref(),
            "--size".as_ref(),
            "30".as_ref(),
            "--out".as_ref(),
            dir.path().join("bad").as_os_str(),
        ],
    );
    assert!(stderr(&out).contains("multiple of 8"), "{}", stderr(&out));
    assert_only(dir.path(), &["syn"]);
}

#[test]
fn a_killed_prepare_leaves_no_store_and_the_next_prepare_in_its_folder_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("big");
    let child = common::Running::spawn(&mut common::probunet(
        dir.path(),
        &[
            "prepare".as_ref(),
            "--synthetic".as_ref(),
            "--items".as_ref(),
            "4000".as_ref(),
            "--size".as_ref(),
            "128".as_ref(),
            "--out".as_ref(),
            out_dir.as_os_str(),
        ],
    ));
    // Kill it hard once it is writing: its array file is there, in the hidden folder it
    // builds the store in (`.big.partial-HOST-PID`, renamed to `big` only when complete).
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let partial = dir
        .path()
        .join(format!(".big.partial-{}-{}", host.trim(), child.id()));
    common::wait_for_path(&partial.join(ARRAYS_FILE));
    let killed = child.kill();
    assert!(
        !killed.status.success(),
        "prepare finished before it was killed:\n{}",
        common::text(&killed)
    );
    assert!(
        partial.is_dir(),
        "the killed prepare left no partial folder, so the next one has nothing to clean up"
    );
    assert!(!out_dir.exists(), "a killed prepare left a store");
    // A prepare of any store in the same folder removes it, not only one of `big`; a
    // hidden folder that holds something else is not a partial store and stays.
    let dead = format!("partial-{}-999999999", host.trim());
    let foreign = dir.path().join(format!(".notes.{dead}"));
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("mine.txt"), "keep").unwrap();
    let stale = dir.path().join(format!(".other.{dead}"));
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join(ARRAYS_FILE), "half a store").unwrap();
    run_ok(
        dir.path(),
        &[
            "prepare".as_ref(),
            "--synthetic".as_ref(),
            "--items".as_ref(),
            "20".as_ref(),
            "--size".as_ref(),
            "32".as_ref(),
            "--out".as_ref(),
            dir.path().join("small").as_os_str(),
        ],
    );
    assert_only(dir.path(), &[&format!(".notes.{dead}"), "small"]);
}

//! Makes the `probunet` binary (and the test binaries) run without `LD_LIBRARY_PATH`
//! and find CUDA on a GPU machine.
//!
//! torch-sys links `libtorch_cuda`, but rustc passes `--as-needed` to the linker and no
//! symbol of ours references that library directly, so it is dropped and libtorch then
//! reports no CUDA device. We re-add it between `--no-as-needed` / `--as-needed`, and set
//! an rpath to the libtorch `lib/` folder that torch-sys built against.
use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    record_git_commit();
    let Some(lib) = env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from) else {
        panic!(
            "torch-sys did not report its libtorch folder; build through `scripts/setup.sh` and \
             `source scripts/env.sh` (or run scripts/test.sh)"
        );
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    build_memory_shim(&lib);
    build_intraop_shim(&lib);
    let cuda = lib.join("libtorch_cuda.so");
    if cuda.exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg={}", cuda.display());
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}

/// src/memory's C++ (the caching CPU allocator, CUDA memory statistics), compiled against
/// the headers next to `lib`.
fn build_memory_shim(lib: &std::path::Path) {
    let sources = ["src/memory/cpu_allocator.cpp", "src/memory/cuda_stats.cpp"];
    for source in sources {
        println!("cargo:rerun-if-changed={source}");
    }
    println!("cargo:rerun-if-env-changed=PROBUNET_PYTHON");
    let include = lib.with_file_name("include");
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .files(sources)
        .include(&include)
        .define("_GLIBCXX_USE_CXX11_ABI", cxx11_abi())
        .flag_if_supported("-Wno-unused-parameter")
        .compile("probunet_memory");
}

/// src/model/intraop.cpp: `at::parallel_for` for probunet's own CPU kernels, and
/// src/model/winograd.cpp: their autograd node. It is OpenMP code, as libtorch's is, and
/// links the `libgomp.so.1` that libtorch loads (the rpath finds libtorch's own), so both
/// share one thread pool.
fn build_intraop_shim(lib: &std::path::Path) {
    let sources = ["src/model/intraop.cpp", "src/model/winograd.cpp"];
    for source in sources {
        println!("cargo:rerun-if-changed={source}");
    }
    let include = lib.with_file_name("include");
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .files(sources)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", cxx11_abi())
        .flag("-fopenmp")
        .flag_if_supported("-Wno-unused-parameter")
        .compile("probunet_intraop");
    println!("cargo:rustc-link-lib=gomp");
}

/// The C++ ABI libtorch was built with, as torch-sys decides it: asked of the python that
/// provides libtorch, the new ABI when there is none to ask.
fn cxx11_abi() -> &'static str {
    let python = env::var("PROBUNET_PYTHON").unwrap_or_else(|_| "python3".into());
    let answer = std::process::Command::new(python)
        .args([
            "-c",
            "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok());
    match answer.as_deref().map(str::trim) {
        Some("0") => "0",
        _ => "1",
    }
}

/// Records the commit being built (run folders note it) when this is a git checkout.
fn record_git_commit() {
    for path in [".git/HEAD", ".git/refs/heads", ".git/packed-refs"] {
        if std::path::Path::new(path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok());
    if let Some(commit) = commit {
        println!("cargo:rustc-env=PROBUNET_GIT_COMMIT={}", commit.trim());
    }
}

//! Facts about this machine that several records carry.

/// Writes `path` and syncs it to disk before returning.
pub fn write_synced(path: &std::path::Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::File::create(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

/// Syncs the folder `dir`, which makes renames into it durable.
pub fn sync_dir(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// The folder holding `path`: `.` for a bare file name.
pub fn parent_dir(path: &std::path::Path) -> &std::path::Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    }
}

/// The host name (which machine ran a trial; TensorBoard's event file names), or
/// `localhost` when it cannot be read.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

/// The libtorch this process runs: the folder its `libtorch_cpu.so` was loaded from (read
/// from `/proc/self/maps`), and the version PyTorch's `version.py` beside that folder
/// gives (`2.11.0+cu130`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Libtorch {
    pub lib_dir: Option<std::path::PathBuf>,
    pub version: Option<String>,
}

pub fn libtorch() -> Libtorch {
    let lib_dir = std::fs::read_to_string("/proc/self/maps")
        .ok()
        .and_then(|maps| loaded_from(&maps, "libtorch_cpu.so"));
    let version = lib_dir
        .as_ref()
        .and_then(|dir| std::fs::read_to_string(dir.parent()?.join("version.py")).ok())
        .and_then(|text| python_version(&text));
    Libtorch { lib_dir, version }
}

/// The folder of the first mapping of `library` in the text of `/proc/<pid>/maps`.
fn loaded_from(maps: &str, library: &str) -> Option<std::path::PathBuf> {
    let path = maps
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| path.ends_with(&format!("/{library}")))?;
    Some(std::path::Path::new(path).parent()?.to_path_buf())
}

/// `__version__ = '2.11.0+cu130'` from a `version.py`.
fn python_version(text: &str) -> Option<String> {
    let line = text.lines().find(|l| l.starts_with("__version__"))?;
    let value = line.split_once('=')?.1.trim();
    Some(value.trim_matches(|c| c == '\'' || c == '"').to_string())
}

/// Whether `name` is the temporary of a process that has ended: `<name><marker><pid>` whose
/// pid is neither this process nor one alive in `/proc`.
fn is_dead_temporary(name: &str, marker: &str) -> bool {
    name.rsplit_once(marker)
        .and_then(|(_, pid)| pid.parse::<u32>().ok())
        .is_some_and(|pid| {
            pid != std::process::id()
                && !std::path::Path::new("/proc").join(pid.to_string()).exists()
        })
}

/// Removes from `dir` the temporaries (files or folders) that ended processes left,
/// named `<name><marker><pid>`: what a killed write leaves before its rename. Those of live
/// processes, which may be writing now, stay. Returns the paths removed.
pub fn remove_dead_temporaries(
    dir: &std::path::Path,
    marker: &str,
) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut removed = Vec::new();
    // Without /proc no process can be told ended, so nothing is removed.
    if !std::path::Path::new("/proc/self").exists() {
        return Ok(removed);
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let dead = entry
            .file_name()
            .to_str()
            .is_some_and(|name| is_dead_temporary(name, marker));
        if dead {
            let path = entry.path();
            match entry.file_type()?.is_dir() {
                true => std::fs::remove_dir_all(&path)?,
                false => std::fs::remove_file(&path)?,
            }
            removed.push(path);
        }
    }
    Ok(removed)
}

/// The widest x86 vector ISA oneDNN uses here: "AVX512" when /proc/cpuinfo lists avx512f
/// (with bw, vl and dq, oneDNN's AVX-512 core), else "AVX2", else "other"; lowered to what
/// `ONEDNN_MAX_CPU_ISA` (or its old name `DNNL_MAX_CPU_ISA`) allows, since oneDNN obeys
/// that cap and a capped AVX-512 machine runs the AVX2 kernels.
pub fn cpu_capability() -> String {
    let flags = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("flags"))
                .map(|l| l.split_whitespace().map(String::from).collect::<Vec<_>>())
        })
        .unwrap_or_default();
    let cap = std::env::var("ONEDNN_MAX_CPU_ISA")
        .or_else(|_| std::env::var("DNNL_MAX_CPU_ISA"))
        .ok();
    capability(&flags, cap.as_deref()).into()
}

/// [`cpu_capability`] for a CPU with `flags` under the oneDNN ISA cap `cap`.
fn capability(flags: &[String], cap: Option<&str>) -> &'static str {
    let has = |flag: &str| flags.iter().any(|f| f == flag);
    let offered = if ["avx512f", "avx512bw", "avx512vl", "avx512dq"]
        .iter()
        .all(|f| has(f))
    {
        "AVX512"
    } else if has("avx2") {
        "AVX2"
    } else {
        "other"
    };
    // oneDNN's names: ALL, DEFAULT, AVX10_*, AVX512_CORE*, AVX2*, AVX, SSE41.
    let allowed = match cap.map(|c| c.trim().to_ascii_uppercase()) {
        None => "AVX512",
        Some(c) if c.is_empty() || c == "ALL" || c == "DEFAULT" => "AVX512",
        Some(c) if c.starts_with("AVX512") || c.starts_with("AVX10") => "AVX512",
        Some(c) if c.starts_with("AVX2") => "AVX2",
        Some(_) => "other",
    };
    let rank = |isa: &str| ["other", "AVX2", "AVX512"].iter().position(|i| *i == isa);
    if rank(allowed) < rank(offered) {
        allowed
    } else {
        offered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_temporaries_of_ended_processes_are_removed() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let ended = child.id();
        child.wait().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = |name: String| dir.path().join(name);
        std::fs::create_dir(path(format!(".a.partial-{ended}"))).unwrap();
        std::fs::write(path(format!(".a.partial-{ended}/samples.npy")), "x").unwrap();
        std::fs::write(path(format!("spec.tmp-{ended}")), "x").unwrap();
        // This process's own, a name without a pid, and another marker's stay.
        std::fs::create_dir(path(format!(".b.partial-{}", std::process::id()))).unwrap();
        std::fs::write(path(".c.partial-x".into()), "x").unwrap();
        std::fs::write(path("notes.partial".into()), "x").unwrap();
        let mut removed = remove_dead_temporaries(dir.path(), ".partial-").unwrap();
        removed.sort();
        assert_eq!(removed, [path(format!(".a.partial-{ended}"))]);
        let removed = remove_dead_temporaries(dir.path(), ".tmp-").unwrap();
        assert_eq!(removed, [path(format!("spec.tmp-{ended}"))]);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let own = format!(".b.partial-{}", std::process::id());
        assert_eq!(left, [own.as_str(), ".c.partial-x", "notes.partial"]);
    }

    #[test]
    fn the_isa_is_what_the_cpu_offers_lowered_to_onednns_cap() {
        let flags = |f: &str| f.split(' ').map(String::from).collect::<Vec<_>>();
        let zen5 = flags("fpu avx2 avx512f avx512bw avx512vl avx512dq avx512_bf16");
        let zen3 = flags("fpu avx avx2 fma");
        assert_eq!(capability(&zen5, None), "AVX512");
        assert_eq!(capability(&zen5, Some("ALL")), "AVX512");
        assert_eq!(capability(&zen5, Some("avx512_core_bf16")), "AVX512");
        assert_eq!(capability(&zen5, Some("AVX2")), "AVX2");
        assert_eq!(capability(&zen5, Some("AVX2_VNNI")), "AVX2");
        assert_eq!(capability(&zen5, Some("SSE41")), "other");
        // A cap above what the CPU has changes nothing.
        assert_eq!(capability(&zen3, Some("AVX512_CORE")), "AVX2");
        assert_eq!(capability(&zen3, None), "AVX2");
        assert_eq!(capability(&flags("fpu sse4_1"), None), "other");
    }

    #[test]
    fn libtorch_is_found_where_this_process_loaded_it() {
        let maps = "7f00-7f10 r-xp 00000000 08:01 42 /venv/torch/lib/libtorch_cpu.so\n\
                    7f20-7f30 r-xp 00000000 08:01 43 /usr/lib/libc.so.6\n";
        assert_eq!(
            loaded_from(maps, "libtorch_cpu.so"),
            Some("/venv/torch/lib".into())
        );
        assert_eq!(
            python_version("__all__ = []\n__version__ = '2.11.0+cu130'\n"),
            Some("2.11.0+cu130".into())
        );
        // This test process links libtorch; a tensor makes sure it is loaded.
        let _ = tch::Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu));
        let found = libtorch();
        assert!(found
            .lib_dir
            .is_some_and(|d| d.join("libtorch_cpu.so").is_file()));
        assert!(found.version.is_some_and(|v| v.starts_with("2.11.0")));
    }

    #[test]
    fn this_cpu_has_a_named_vector_isa() {
        assert!(["AVX512", "AVX2", "other"].contains(&cpu_capability().as_str()));
    }
}

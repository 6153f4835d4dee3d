//! CPU time from /proc, shared by the benchmarks.

/// User and system CPU seconds of a process or thread, from its `/proc/.../stat`.
pub fn cpu_secs(stat_path: impl AsRef<std::path::Path>) -> f64 {
    let stat = std::fs::read_to_string(stat_path).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// User and system CPU seconds of every process named `postgres` on this machine (the local
/// PostgreSQL server: postmaster, backends, WAL writer, checkpointer, autovacuum). A backend that
/// exited between two readings takes its seconds with it: the benchmarks keep their pools open.
#[allow(dead_code)] // the load benchmark's only
pub fn postgres_cpu_secs() -> f64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .filter(|e| std::fs::read_to_string(e.path().join("comm")).is_ok_and(|comm| comm.trim_end() == "postgres"))
        .map(|e| cpu_secs(e.path().join("stat")))
        .sum()
}

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

/// CPU seconds of every process named `postgres` on this machine (the local PostgreSQL server:
/// postmaster, backends, WAL writer, checkpointer, autovacuum), by pid, to measure what the server
/// spent between two moments.
#[allow(dead_code)] // the load benchmark's only
pub struct PostgresCpu(std::collections::HashMap<u32, f64>);

#[allow(dead_code)]
impl PostgresCpu {
    pub fn now() -> PostgresCpu {
        let mut by_pid = std::collections::HashMap::new();
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.filter_map(Result::ok) {
                let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                if std::fs::read_to_string(entry.path().join("comm")).is_ok_and(|c| c.trim_end() == "postgres") {
                    by_pid.insert(pid, cpu_secs(entry.path().join("stat")));
                }
            }
        }
        PostgresCpu(by_pid)
    }

    /// Seconds spent since `self` by the processes alive now (a process that started since counts
    /// whole; one that exited meanwhile, e.g. a closed connection's backend, is not counted: close
    /// pools after reading).
    pub fn since(&self) -> f64 {
        PostgresCpu::now()
            .0
            .iter()
            .map(|(pid, now)| now - self.0.get(pid).copied().unwrap_or(0.0))
            .filter(|d| *d > 0.0)
            .sum()
    }
}

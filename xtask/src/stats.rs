//! Order statistics for the benchmarks.

/// The value at fraction `p` (0 to 1) of the sorted values, nearest rank.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// The median, averaging the middle pair of an even count.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) { (sorted[mid - 1] + sorted[mid]) / 2.0 } else { sorted[mid] }
}

/// Print a benchmark's JSON report and keep it as `<target dir>/bench/<name>.json`.
pub fn publish(name: &str, report: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(report)?);
    let dir = crate::target_dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(format!("{name}.json")), serde_json::to_vec_pretty(report)?)?;
    Ok(())
}

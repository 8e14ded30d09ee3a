//! `copilot-ingest bench`: one data set of N events preloaded into the embedded
//! broker running in its own process, then, in one run:
//! - the raw consume limit (the product's consumer configuration, discarding),
//! - the raw sink limits (PostgreSQL `COPY`, SQLite one prepared insert in one
//!   transaction) for the same rows the sink stores, source columns included,
//! - copilot-ingest end to end into each sink (its own process: events/s, CPU
//!   seconds per million events, peak RSS),
//! - end-to-end latency at half the measured throughput (and the Web API's
//!   reads at half load), produced live to a topic of few partitions on a
//!   second embedded broker,
//!
//! and prints one table with the ratios to min(raw consume, raw sink).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::Utc;
use rdkafka::consumer::{BaseConsumer, Consumer};

mod plots;
mod raw;
mod webapi;

use crate::cli::{Load, produce_events};
use crate::config::Config;
use crate::generator::Generator;
use crate::normalize::Normalizer;
use crate::record::Record;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Events in the data set.
    #[arg(long, default_value_t = 500_000)]
    events: u64,
    /// Partitions of the benchmark topic.
    #[arg(long, default_value_t = 64)]
    partitions: i32,
    /// Partitions of the topic the fixed-rate phases (latency, reads at half
    /// load) produce to, on an embedded broker of their own. The preloaded
    /// topic needs many (the embedded broker keeps ~5 MB per partition), but
    /// the embedded broker's CPU grows with them, on the cores the service is
    /// measured on.
    #[arg(long, default_value_t = 8)]
    live_partitions: i32,
    /// Sinks to measure.
    #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres")]
    sinks: Vec<String>,
    /// PostgreSQL server (a fresh database is created and dropped).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    pg_admin_url: String,
    /// Seconds of the fixed-rate latency phase per sink (0 skips it).
    #[arg(long, default_value_t = 20)]
    latency_seconds: u64,
    /// Event rate of the latency phase (0: the loads below, as fractions of the sink's measured throughput).
    #[arg(long, default_value_t = 0)]
    latency_rate: u64,
    /// Offered loads of the latency phase, as fractions of the drain rate.
    #[arg(long, value_delimiter = ',', default_value = "0.5")]
    latency_loads: Vec<f64>,
    /// Write the measurements as CSV here (drain progress over time, the raw
    /// limits, latency against load) for `scripts/plot_bench.py`.
    #[arg(long)]
    plots: Option<std::path::PathBuf>,
    /// Seconds of the Web API's idle read phase per sink (0 skips the Web API phases).
    #[arg(long, default_value_t = 10)]
    api_seconds: u64,
    /// Retrieve requests per second in the Web API phases.
    #[arg(long, default_value_t = 200)]
    api_rate: u64,
}

/// The SQLite writer alone, as a baseline row.
const WRITER_ALONE: &str = "SQLite writer alone (the service's write path, no Kafka)";

/// Batches per transaction for the writer-alone baseline: what the group
/// commit gathered in drains with 16 batches in flight (about 7,000 rows per
/// commit with 1,000-record batches). With the default 32 it gathers
/// 11,000–12,500, so a drain may beat this baseline; it stays at eight so
/// that its figures compare across runs.
const WRITER_GROUP: usize = 8;

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Default)]
struct Row {
    name: String,
    events_per_s: f64,
    cpu_s_per_million: Option<f64>,
    peak_rss_mb: Option<f64>,
    note: String,
    /// A drain's progress: (seconds since the first event, records written).
    drain: Vec<(f64, f64)>,
}

/// An embedded broker in its own process with `topic` (and its DLQ topic);
/// the process and its bootstrap address.
fn start_broker(exe: &std::path::Path, topic: &str, partitions: i32) -> anyhow::Result<(KillOnDrop, String)> {
    let mut broker = KillOnDrop(
        Command::new(exe)
            .args(["broker", "--partitions", &partitions.to_string()])
            .env("COPILOT_INGEST__KAFKA__TOPIC", topic)
            .env("COPILOT_INGEST__KAFKA__DLQ_TOPIC", format!("{topic}.dlq"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let mut first_line = String::new();
    BufReader::new(broker.0.stdout.take().ok_or_else(|| anyhow::anyhow!("broker stdout"))?)
        .read_line(&mut first_line)?;
    Ok((broker, first_line.trim().to_owned()))
}

pub async fn run(config: Config, args: BenchArgs, quiet: bool) -> anyhow::Result<i32> {
    let exe = std::env::current_exe()?;
    let topic = format!("bench.{}", uuid::Uuid::new_v4().simple());
    let n = args.events;
    eprintln!("starting the embedded broker in its own process ({} partitions)…", args.partitions);
    let (_broker, brokers) = start_broker(&exe, &topic, args.partitions)?;
    // The fixed-rate phases produce to a topic of their own with few
    // partitions: at 56,000 events/s the embedded broker took 8.1 CPU s per
    // 1.12M events with 64 partitions against 1.0 with 8, CPU a broker on
    // its own machines would not take from the service (SQLite p99 2.5 s
    // against 0.5 s at that rate).
    let live_topic = format!("{topic}.live");
    let (_live_broker, live_brokers) = start_broker(&exe, &live_topic, args.live_partitions)?;
    eprintln!("broker at {brokers}; preloading {n} events…");
    // Round-robin: the embedded broker keeps ~5 MB per partition, so the data
    // set must spread evenly to be kept whole.
    let load = Load {
        count: n,
        rate: 0,
        invalid_ratio: 0.0,
        seed: 7,
        progress: false,
        avro_schema_id: None,
        round_robin_partitions: Some(args.partitions),
    };
    produce_events(&brokers, &topic, &[], load, None).await?;

    let mut rows = Vec::new();
    eprintln!("raw consume…");
    let raw_consume = raw_consume(&brokers, &topic, n).await?;
    rows.push(Row { name: "raw consume (rdkafka, same config)".into(), events_per_s: raw_consume, ..Row::default() });
    let mut plots = args.plots.as_deref().map(plots::Plots::new).transpose()?;
    if let Some(p) = &mut plots {
        p.limit("all", "raw consume", raw_consume);
    }

    let records = tokio::task::spawn_blocking(move || normalized(n)).await?;
    let dir = std::env::temp_dir().join(format!("copilot-ingest-bench-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    let mut e2e_rows = Vec::new();
    let mut api_lines = Vec::new();
    let mut baselines: Vec<(&str, f64)> = Vec::new();
    let mut bare_rate: Option<f64> = None;
    for sink in &args.sinks {
        let mut api_databases = Vec::new();
        let (url, raw_rate, cleanup) = match sink.as_str() {
            "sqlite" => {
                eprintln!("raw SQLite insert…");
                let raw_path = dir.join("raw.db");
                let recs = records.clone();
                let rate = tokio::task::spawn_blocking(move || raw::raw_sqlite(&raw_path, &recs)).await??;
                eprintln!("the SQLite writer alone…");
                let (writer_path, recs) = (dir.join("writer.db"), records.clone());
                let batch_rows = config.batch.max_records;
                let writer = tokio::task::spawn_blocking(move || {
                    raw::sqlite_writer_alone(&writer_path, &recs, batch_rows, WRITER_GROUP)
                })
                .await??;
                baselines.push((WRITER_ALONE, writer));
                (format!("sqlite://{}", dir.join("e2e.db").display()), rate, None)
            }
            "postgres" => {
                let admin =
                    crate::backend::postgres::connect(&args.pg_admin_url).await.map_err(|e| anyhow::anyhow!("{e}"))?;
                let raw_db = format!("copilot_bench_raw_{}", uuid::Uuid::new_v4().simple());
                let e2e_db = format!("copilot_bench_e2e_{}", uuid::Uuid::new_v4().simple());
                admin.batch_execute(&format!("CREATE DATABASE {raw_db}; ")).await?;
                admin.batch_execute(&format!("CREATE DATABASE {e2e_db}")).await?;
                let base = args.pg_admin_url.rsplit_once('/').map(|(b, _)| b.to_owned()).unwrap_or_default();
                // The other COPY baselines, each into a fresh database: the
                // bare table is the database's limit, the previous index set
                // what this release's indexes are measured against.
                let mut databases = vec![raw_db.clone(), e2e_db.clone()];
                for variant in [raw::CopyTable::Bare, raw::CopyTable::PreviousIndexes] {
                    let db = format!("copilot_bench_copy_{}", uuid::Uuid::new_v4().simple());
                    admin.batch_execute(&format!("CREATE DATABASE {db}")).await?;
                    databases.push(db.clone());
                    eprintln!("{}…", variant.describe());
                    let rate = raw::raw_copy(&format!("{base}/{db}"), &records, variant).await?;
                    baselines.push((variant.describe(), rate));
                }
                eprintln!("raw PostgreSQL COPY…");
                let rate = raw::raw_copy(&format!("{base}/{raw_db}"), &records, raw::CopyTable::Product).await?;
                (format!("{base}/{e2e_db}"), rate, Some((admin, databases)))
            }
            other => anyhow::bail!("unknown sink {other}"),
        };
        for (name, rate) in baselines.drain(..) {
            rows.push(Row { name: name.into(), events_per_s: rate, ..Row::default() });
            bare_rate = bare_rate.or((name == raw::CopyTable::Bare.describe()).then_some(rate));
        }
        let raw_name = if sink == "sqlite" {
            "raw SQLite (prepared insert, one transaction)"
        } else {
            raw::CopyTable::Product.describe()
        };
        rows.push(Row { name: raw_name.into(), events_per_s: raw_rate, ..Row::default() });
        if let Some(p) = &mut plots {
            p.limit(sink, raw_name, raw_rate);
            if let Some(bare) = bare_rate {
                p.limit(sink, raw::CopyTable::Bare.describe(), bare);
            }
        }
        eprintln!("copilot-ingest end to end into {sink}…");
        let e2e = end_to_end(&exe, &brokers, &topic, &url, n, quiet, None).await?;
        let limit = raw_consume.min(raw_rate);
        e2e_rows.push((sink.clone(), e2e.events_per_s));
        let mut note = format!("{:.0}% of min(raw consume, raw sink)", 100.0 * e2e.events_per_s / limit);
        if let Some(bare) = bare_rate.take() {
            note.push_str(&format!("; {:.0}% of COPY into the bare table", 100.0 * e2e.events_per_s / bare));
        }
        if let Some(p) = &plots {
            p.drain(sink, &e2e.drain)?;
        }
        rows.push(Row { name: format!("copilot-ingest → {sink}"), note, ..e2e });
        if args.api_seconds > 0 {
            let drain_url = match &cleanup {
                None => format!("sqlite://{}", dir.join("api.db").display()),
                Some((admin, _)) => {
                    let db = format!("copilot_bench_api_{}", uuid::Uuid::new_v4().simple());
                    admin.batch_execute(&format!("CREATE DATABASE {db}")).await?;
                    let base = args.pg_admin_url.rsplit_once('/').map(|(b, _)| b.to_owned()).unwrap_or_default();
                    api_databases.push(db.clone());
                    format!("{base}/{db}")
                }
            };
            let phase = ApiPhase {
                exe: &exe,
                brokers: &brokers,
                topic: &topic,
                live_brokers: &live_brokers,
                live_topic: &live_topic,
                n,
                seconds: args.api_seconds,
                rate: args.api_rate,
            };
            api_lines.push(phase.run(sink, &url, &drain_url, e2e.events_per_s, quiet).await?);
        }
        if let Some((admin, mut dbs)) = cleanup {
            dbs.append(&mut api_databases);
            for db in dbs {
                let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await;
            }
        } else {
            for file in ["e2e.db", "api.db"] {
                raw::remove_database(&dir.join(file));
            }
        }
    }

    let mut latency_lines = Vec::new();
    if args.latency_seconds > 0 {
        let loads: Vec<(String, u64)> = e2e_rows
            .iter()
            .flat_map(|(sink, rate)| {
                let rates: Vec<u64> = if args.latency_rate > 0 {
                    vec![args.latency_rate]
                } else {
                    args.latency_loads.iter().map(|f| (rate * f).max(100.0) as u64).collect()
                };
                rates.into_iter().map(move |r| (sink.clone(), r))
            })
            .collect();
        for (sink, half) in &loads {
            let (sink, half) = (sink, *half);
            let mut database = None;
            let url = if sink == "sqlite" {
                // A fresh file per load, as each PostgreSQL phase gets a fresh database.
                format!("sqlite://{}", dir.join(format!("latency-{half}.db")).display())
            } else {
                let admin =
                    crate::backend::postgres::connect(&args.pg_admin_url).await.map_err(|e| anyhow::anyhow!("{e}"))?;
                let db = format!("copilot_bench_lat_{}", uuid::Uuid::new_v4().simple());
                admin.batch_execute(&format!("CREATE DATABASE {db}")).await?;
                let base = args.pg_admin_url.rsplit_once('/').map(|(b, _)| b.to_owned()).unwrap_or_default();
                let url = format!("{base}/{db}");
                database = Some((admin, db));
                url
            };
            eprintln!("latency at {half} events/s into {sink} for {}s…", args.latency_seconds);
            let (p50, p99, written) =
                latency(&exe, &live_brokers, &live_topic, &url, half, args.latency_seconds).await?;
            if let Some(path) = url.strip_prefix("sqlite://") {
                raw::remove_database(std::path::Path::new(path));
            }
            if let Some((admin, db)) = database {
                let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await;
            }
            latency_lines.push(format!(
                "| {sink} | {half} | {:.0} ms | {:.0} ms | {} of {} |",
                p50 * 1000.0,
                p99 * 1000.0,
                written,
                half * args.latency_seconds
            ));
            if let Some(p) = &mut plots {
                p.latency(sink, half, p50, p99);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(p) = &plots {
        p.finish()?;
    }

    println!(
        "\n{n} events of ~{} bytes, {} partitions ({} in the fixed-rate phases), default batch settings\n",
        typical_size(),
        args.partitions,
        args.live_partitions
    );
    println!("| measurement | events/s | CPU s per 1M events | peak RSS | ratio |");
    println!("|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {:.0} | {} | {} | {} |",
            r.name,
            r.events_per_s,
            r.cpu_s_per_million.map(|c| format!("{c:.1}")).unwrap_or_default(),
            r.peak_rss_mb.map(|m| format!("{m:.0} MB")).unwrap_or_default(),
            r.note
        );
    }
    if !api_lines.is_empty() {
        println!(
            "\nEach reader alone while the service ingests at half its drain rate, then both readers during a full drain:\n\n| Web API on | ingesting (events/s offered) | Retrieve p50 / p99 at {} req/s | RetrieveMultiple (5,000-row pages) | ingested meanwhile | drain with both readers vs without | readers during that drain: Retrieve p50 / p99, RetrieveMultiple |\n|---|---|---|---|---|---|---|",
            args.api_rate
        );
        for l in api_lines {
            println!("{l}");
        }
    }
    if !latency_lines.is_empty() {
        // Written of offered: the embedded broker keeps a few MB per partition,
        // so a service that falls that far behind loses events, and its
        // latency would then describe only the events it got.
        println!(
            "\n| sink | rate (events/s) | p50 end-to-end | p99 end-to-end | written of offered |\n|---|---|---|---|---|"
        );
        for l in latency_lines {
            println!("{l}");
        }
    }
    Ok(0)
}

fn typical_size() -> usize {
    let mut g = Generator::new(7, 0.0);
    (0..100).map(|_| g.next(false).value.len()).sum::<usize>() / 100
}

/// The data set, normalized as the pipeline would (for the raw sink baselines).
fn normalized(n: u64) -> Vec<Record> {
    let mut g = Generator::new(7, 0.0);
    let normalizer = Normalizer::default();
    let now = Utc::now();
    (0..n).filter_map(|_| normalizer.normalize_json(&g.next(false).value, None, now).ok()).collect()
}

async fn raw_consume(brokers: &str, topic: &str, n: u64) -> anyhow::Result<f64> {
    let brokers = brokers.to_owned();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || -> anyhow::Result<f64> {
        let consumer: BaseConsumer = crate::transport::ingest::source::consumer_config(
            &brokers,
            &format!("bench-raw-{}", uuid::Uuid::new_v4().simple()),
            &[],
        )
        .set("statistics.interval.ms", "0")
        .create()?;
        consumer.subscribe(&[&topic])?;
        let mut seen = 0u64;
        let mut started = None;
        let deadline = Instant::now() + Duration::from_secs(600);
        while seen < n && Instant::now() < deadline {
            if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
                started.get_or_insert_with(Instant::now);
                seen += 1;
            }
        }
        let secs = started.map(|s| s.elapsed().as_secs_f64()).unwrap_or(f64::INFINITY);
        Ok(seen as f64 / secs)
    })
    .await?
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn scrape(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else { return String::new() };
    if s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.is_err() {
        return String::new();
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The Web API on loopback, without authentication (the benchmark's own machine).
fn with_api(command: &mut Command, port: u16) {
    command.env("COPILOT_INGEST__API__LISTEN", format!("127.0.0.1:{port}")).env("COPILOT_INGEST__API__AUTH", "none");
}

fn ingest_command(exe: &std::path::Path, brokers: &str, topic: &str, url: &str, port: u16) -> Command {
    let mut command = Command::new(exe);
    command
        .arg("run")
        .env("COPILOT_INGEST__KAFKA__BROKERS", brokers)
        .env("COPILOT_INGEST__KAFKA__TOPIC", topic)
        .env("COPILOT_INGEST__KAFKA__DLQ_TOPIC", format!("{topic}.dlq"))
        .env("COPILOT_INGEST__KAFKA__GROUP_ID", format!("bench-{}", uuid::Uuid::new_v4().simple()))
        .env("COPILOT_INGEST__SINK__URL", url)
        .env("COPILOT_INGEST__METRICS__LISTEN", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

/// (utime + stime seconds, peak RSS MB) of a child process, from /proc.
fn usage(pid: u32) -> (Option<f64>, Option<f64>) {
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| {
        let rest = s.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
        Some(ticks / 100.0)
    });
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map(|kb| kb / 1024.0);
    (cpu, rss)
}

async fn end_to_end(
    exe: &std::path::Path,
    brokers: &str,
    topic: &str,
    url: &str,
    n: u64,
    quiet: bool,
    api_port: Option<u16>,
) -> anyhow::Result<Row> {
    let port = free_port()?;
    let mut command = ingest_command(exe, brokers, topic, url, port);
    if let Some(api) = api_port {
        with_api(&mut command, api);
    }
    let child = KillOnDrop(command.spawn()?);
    let pid = child.0.id();
    let mut started: Option<Instant> = None;
    let mut finished = None;
    let mut cpu_at_start = None;
    let mut written: f64;
    let mut last_progress = (Instant::now(), 0.0);
    let mut display = crate::progress::Progress::start(quiet, Some(n));
    let mut drain = Vec::new();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let text = scrape(port).await;
        let received = metric(&text, "copilot_ingest_events_received_total");
        written = metric(&text, "copilot_ingest_records_written_total");
        if let Some(s) = started {
            drain.push((s.elapsed().as_secs_f64(), written));
        }
        display.update(written as u64, || {
            let rate = started.map(|s: Instant| written / s.elapsed().as_secs_f64().max(1e-3)).unwrap_or(0.0);
            format!(
                "{} of {} written, {} events/s",
                crate::progress::thousands(written as u64),
                crate::progress::thousands(n),
                crate::progress::thousands(rate as u64)
            )
        });
        if written > last_progress.1 {
            last_progress = (Instant::now(), written);
            finished = Some(Instant::now());
        } else if last_progress.0.elapsed() > Duration::from_secs(30) {
            eprintln!("no progress for 30 s at {written} of {n} records; reporting what was written");
            break;
        }
        if received > 0.0 && started.is_none() {
            started = Some(Instant::now());
            cpu_at_start = usage(pid).0;
        }
        if written >= n as f64 {
            break;
        }
    }
    display.finish();
    let secs = started.zip(finished).map(|(s, f)| (f - s).as_secs_f64()).unwrap_or(f64::INFINITY);
    let (cpu, rss) = usage(pid);
    let cpu_per_million = cpu.zip(cpu_at_start).map(|(end, start)| (end - start) * 1_000_000.0 / written.max(1.0));
    drop(child);
    Ok(Row {
        events_per_s: written / secs,
        cpu_s_per_million: cpu_per_million,
        peak_rss_mb: rss,
        drain,
        ..Row::default()
    })
}

/// p50 and p99 of the end-to-end histogram, and the records written, while
/// events arrive at `rate`. A
/// fresh ingestor starts at the end of the topic (the backlog is not its
/// concern), then events are produced at the fixed rate.
async fn latency(
    exe: &std::path::Path,
    brokers: &str,
    topic: &str,
    url: &str,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<(f64, f64, u64)> {
    let port = free_port()?;
    let mut command = ingest_command(exe, brokers, topic, url, port);
    command.env("COPILOT_INGEST__KAFKA__OPTIONS__AUTO_OFFSET_RESET", "latest");
    let child = KillOnDrop(command.spawn()?);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && !scrape(port).await.contains("copilot_ingest_build_info") {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Let the group form before the clock starts.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let load = Load {
        count: rate * seconds,
        rate,
        invalid_ratio: 0.0,
        seed: 9,
        progress: false,
        avro_schema_id: None,
        round_robin_partitions: None,
    };
    produce_events(brokers, topic, &[], load, None).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let text = scrape(port).await;
    drop(child);
    let written = metric(&text, "copilot_ingest_records_written_total") as u64;
    Ok((quantile(&text, 0.5), quantile(&text, 0.99), written))
}

/// A quantile of `copilot_ingest_end_to_end_seconds` from a scrape (NaN without observations).
fn quantile(text: &str, q: f64) -> f64 {
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| l.starts_with("copilot_ingest_end_to_end_seconds_bucket"))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    crate::metrics::bucket_quantile(&buckets, q).unwrap_or(f64::NAN)
}

/// The Web API's read rates on one sink: readers alone on the drained table,
/// then readers while the same kind of service drains the topic again.
struct ApiPhase<'a> {
    exe: &'a std::path::Path,
    /// The preloaded topic, drained with the readers on.
    brokers: &'a str,
    topic: &'a str,
    /// The topic events are produced to at half the drain rate.
    live_brokers: &'a str,
    live_topic: &'a str,
    n: u64,
    seconds: u64,
    rate: u64,
}

impl ApiPhase<'_> {
    async fn run(
        &self,
        sink: &str,
        url: &str,
        drain_url: &str,
        drain_rate: f64,
        quiet: bool,
    ) -> anyhow::Result<String> {
        use std::sync::Arc;
        use std::sync::atomic::AtomicBool;
        let ms = |s: f64| s * 1000.0;
        // Each reader alone on the drained table while the service ingests
        // new events at half its measured drain rate.
        let half = (drain_rate / 2.0).max(100.0) as u64;
        let (port, api) = (free_port()?, free_port()?);
        let mut command = ingest_command(self.exe, self.live_brokers, self.live_topic, url, port);
        command.env("COPILOT_INGEST__KAFKA__OPTIONS__AUTO_OFFSET_RESET", "latest");
        with_api(&mut command, api);
        let child = KillOnDrop(command.spawn()?);
        let base = format!("http://127.0.0.1:{api}/api/data/v9.2");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut ids = Vec::new();
        while ids.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let b = base.clone();
            ids = tokio::task::spawn_blocking(move || webapi::ids(&b, 1000)).await?;
        }
        // Let the group form before the clock starts.
        tokio::time::sleep(Duration::from_secs(3)).await;
        eprintln!("Web API on {sink}: each reader alone for {}s while ingesting {half} events/s…", self.seconds);
        let load = Load {
            count: half * (2 * self.seconds + 2),
            rate: half,
            invalid_ratio: 0.0,
            seed: 11,
            progress: false,
            avro_schema_id: None,
            round_robin_partitions: None,
        };
        let (brokers, topic) = (self.live_brokers.to_owned(), self.live_topic.to_owned());
        let producing = tokio::spawn(async move { produce_events(&brokers, &topic, &[], load, None).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        let written = || async { metric(&scrape(port).await, "copilot_ingest_records_written_total") };
        let (w0, t0) = (written().await, Instant::now());
        let never = Arc::new(AtomicBool::new(false));
        let (b, i, n, r, seconds) = (base.clone(), ids.clone(), Arc::clone(&never), self.rate, self.seconds);
        let (latencies, failed) =
            tokio::task::spawn_blocking(move || webapi::retrieve_load(&b, &i, r, seconds, &n)).await?;
        let (b, n) = (base.clone(), Arc::clone(&never));
        let (rows, rows_seconds) = tokio::task::spawn_blocking(move || webapi::page_load(&b, seconds, &n)).await?;
        let ingested = (written().await - w0) / t0.elapsed().as_secs_f64();
        let _ = producing.await;
        drop(child);
        let alone = webapi::Reads { retrieve_seconds: latencies, retrieve_errors: failed, rows, rows_seconds };

        // Both readers while a service drains the whole topic into a fresh table.
        eprintln!("Web API on {sink}: both readers while draining {} events…", self.n);
        let api = free_port()?;
        let base = format!("http://127.0.0.1:{api}/api/data/v9.2");
        let stop = Arc::new(AtomicBool::new(false));
        let readers = tokio::spawn(webapi::read_load(base, ids, self.rate, 3600, Arc::clone(&stop)));
        let drain = end_to_end(self.exe, self.brokers, self.topic, drain_url, self.n, quiet, Some(api)).await?;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let busy = readers.await?;
        Ok(format!(
            "| {sink} | {half} | {:.1} / {:.1} ms ({} requests, {} failed) | {:.0} rows/s | {:.0} events/s | {:.0} events/s = {:.0}% of {:.0} | {:.1} / {:.1} ms, {:.0} rows/s |",
            ms(alone.percentile(0.5)),
            ms(alone.percentile(0.99)),
            alone.retrieve_seconds.len(),
            alone.retrieve_errors,
            alone.rows_per_second(),
            ingested,
            drain.events_per_s,
            100.0 * drain.events_per_s / drain_rate.max(1e-9),
            drain_rate,
            ms(busy.percentile(0.5)),
            ms(busy.percentile(0.99)),
            busy.rows_per_second(),
        ))
    }
}

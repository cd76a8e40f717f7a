//! `kubbi-netsim`: regions on one machine, for development, tests and benchmarks.
//!
//! These machines' kernels have no `netem` qdisc, so the wide-area network lives in user space:
//! a TCP proxy per directed link (a node dialing a peer in another region, a region's clients
//! dialing another region's node), each adding one-way delay, jitter and loss to both
//! directions of every connection it carries. A control port cuts and heals links between
//! regions, for partition tests.
//!
//! ```text
//!   node 1 (eu) ──▶ 127.0.0.1:P12 ─[ +20 ms ±2 ]─▶ node 2 (us) internal port
//!               ◀──────────────────[ +20 ms ±2 ]◀─
//! ```
//!
//! Started from a JSON file (`cluster/up --regions` writes it):
//!
//! ```json
//! {"control": "127.0.0.1:7800",
//!  "links": [{"listen": "127.0.0.1:7801", "target": "127.0.0.1:7071",
//!             "from": "eu", "to": "us", "delay_ms": 20, "jitter_ms": 2, "loss": 0.001}]}
//! ```
//!
//! A `listen` or `control` address with port 0 gets a free port. Once every listener is bound it
//! prints one line on stdout, `ready {"control": ADDR, "links": [ADDR, ...]}` (the links' listen
//! addresses in the order of the file). The control port takes one command per line and answers
//! one line (`ok ...` or `error: ...`):
//!
//! | command | effect |
//! |---|---|
//! | `cut A` | cut every link between region A and any other region |
//! | `cut A B` | cut the links between A and B, both ways |
//! | `heal`, `heal A`, `heal A B` | undo those cuts |
//! | `status` | one JSON line: the cut pairs and each link's counters |
//!
//! **What a cut does.** A partition is silence, not a reset: a cut link forwards nothing and
//! discards what it reads, and a connection opened across it is accepted and then hears
//! nothing, so peers learn of the cut by their own timeouts, as they would across a real
//! network. Bytes discarded leave a gap in the stream, so at the heal every connection that
//! lost bytes is closed (peers see EOF and reconnect, as after a middlebox dropped its state).
//!
//! **Model.** A chunk read from one side is written to the other at `read time + delay ±
//! jitter`, never before an earlier chunk of the same direction (TCP delivers in order). A
//! chunk is "lost" with probability `loss`: it and everything behind it are held one
//! retransmission timeout longer (200 ms + the round trip), which is what a lost segment
//! costs a TCP stream. Bandwidth is not limited.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// How long a lost segment holds a stream up, beyond the round trip (Linux's minimum RTO).
const RTO_MIN: Duration = Duration::from_millis(200);
/// Largest chunk read at once.
const CHUNK: usize = 64 * 1024;
/// Chunks in flight per direction of a connection.
const QUEUE: usize = 256;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Where the control port listens.
    control: String,
    links: Vec<LinkSpec>,
}

/// One directed link: connections from region `from` to `target`, which lives in `to`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkSpec {
    listen: String,
    target: String,
    from: String,
    to: String,
    /// One-way delay, added to each direction.
    #[serde(default)]
    delay_ms: f64,
    /// Uniform jitter, ± this many milliseconds around the delay.
    #[serde(default)]
    jitter_ms: f64,
    /// Probability that a chunk is lost (and retransmitted).
    #[serde(default)]
    loss: f64,
}

/// Counters of one link.
#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    bytes: AtomicU64,
    discarded: AtomicU64,
    lost: AtomicU64,
}

struct Link {
    spec: LinkSpec,
    counters: Counters,
}

impl Link {
    fn pair(&self) -> (String, String) {
        pair(&self.spec.from, &self.spec.to)
    }

    /// When a chunk read at `now` is due at the other side, given the previous chunk's.
    fn due(&self, now: Instant, last: Instant) -> Instant {
        let s = &self.spec;
        let jitter = if s.jitter_ms > 0.0 {
            (rand::random::<f64>() * 2.0 - 1.0) * s.jitter_ms
        } else {
            0.0
        };
        let mut ms = (s.delay_ms + jitter).max(0.0);
        if s.loss > 0.0 && rand::random::<f64>() < s.loss {
            self.counters.lost.fetch_add(1, Ordering::Relaxed);
            ms += RTO_MIN.as_secs_f64() * 1e3 + 2.0 * s.delay_ms;
        }
        (now + Duration::from_secs_f64(ms / 1e3)).max(last)
    }
}

/// An unordered pair of regions.
fn pair(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_string(), b.to_string())
    } else {
        (b.to_string(), a.to_string())
    }
}

/// Which region pairs are cut. Every change bumps the version, which connections watch.
struct Net {
    cut: Mutex<BTreeSet<(String, String)>>,
    version: watch::Sender<u64>,
    regions: BTreeSet<String>,
}

impl Net {
    fn is_cut(&self, p: &(String, String)) -> bool {
        self.cut
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(p)
    }

    /// Whether `p` is cut; if so, marks the connection as having lost bytes, under the same
    /// lock a heal takes (so a heal either sees the mark or happens before the check).
    fn lose_if_cut(&self, p: &(String, String), lost: &AtomicBool) -> bool {
        let cut = self.cut.lock().unwrap_or_else(|e| e.into_inner());
        if cut.contains(p) {
            lost.store(true, Ordering::Relaxed);
        }
        lost.load(Ordering::Relaxed)
    }

    /// The pairs a `cut`/`heal` command names: `A` alone means A and every other region.
    fn pairs(&self, args: &[&str]) -> Result<Vec<(String, String)>, String> {
        for r in args {
            if !self.regions.contains(*r) {
                return Err(format!("unknown region {r}"));
            }
        }
        Ok(match args {
            [a] => self
                .regions
                .iter()
                .filter(|r| r.as_str() != *a)
                .map(|r| pair(a, r))
                .collect(),
            [a, b] if a != b => vec![pair(a, b)],
            _ => return Err("name one region, or two different ones".into()),
        })
    }

    fn command(&self, line: &str, links: &[Arc<Link>]) -> String {
        let words: Vec<&str> = line.split_whitespace().collect();
        let changed = match words.as_slice() {
            ["cut", rest @ ..] => self.pairs(rest).map(|ps| {
                let mut c = self.cut.lock().unwrap_or_else(|e| e.into_inner());
                ps.into_iter().for_each(|p| {
                    c.insert(p);
                });
            }),
            ["heal"] => {
                self.cut.lock().unwrap_or_else(|e| e.into_inner()).clear();
                Ok(())
            }
            ["heal", rest @ ..] => self.pairs(rest).map(|ps| {
                let mut c = self.cut.lock().unwrap_or_else(|e| e.into_inner());
                ps.iter().for_each(|p| {
                    c.remove(p);
                });
            }),
            ["status"] => return format!("ok {}", self.status(links)),
            _ => Err(format!("unknown command `{line}`")),
        };
        match changed {
            Ok(()) => {
                self.version.send_modify(|v| *v += 1);
                let cut = self.cut.lock().unwrap_or_else(|e| e.into_inner());
                format!("ok cut={}", cut.len())
            }
            Err(e) => format!("error: {e}"),
        }
    }

    fn status(&self, links: &[Arc<Link>]) -> String {
        let cut: Vec<String> = self
            .cut
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(a, b)| format!("{a}-{b}"))
            .collect();
        let links: Vec<serde_json::Value> = links
            .iter()
            .map(|l| {
                let c = &l.counters;
                serde_json::json!({
                    "listen": l.spec.listen, "target": l.spec.target,
                    "from": l.spec.from, "to": l.spec.to,
                    "connections": c.connections.load(Ordering::Relaxed),
                    "bytes": c.bytes.load(Ordering::Relaxed),
                    "discarded": c.discarded.load(Ordering::Relaxed),
                    "lost": c.lost.load(Ordering::Relaxed),
                })
            })
            .collect();
        serde_json::json!({"cut": cut, "links": links}).to_string()
    }
}

/// What a pump hands its writer: bytes due at an instant, or the end of the stream.
enum Item {
    Data(Instant, Vec<u8>),
    Eof(Instant),
}

/// Carries one connection across `link` until either side ends it, or a heal closes it.
async fn carry(client: TcpStream, link: Arc<Link>, net: Arc<Net>) {
    link.counters.connections.fetch_add(1, Ordering::Relaxed);
    let p = link.pair();
    let lost = Arc::new(AtomicBool::new(false));
    let mut version = net.version.subscribe();
    let _ = client.set_nodelay(true);
    let server = if net.is_cut(&p) {
        None
    } else {
        match tokio::time::timeout(
            Duration::from_secs(2),
            TcpStream::connect(&link.spec.target),
        )
        .await
        {
            Ok(Ok(s)) => Some(s),
            _ => return,
        }
    };
    let Some(server) = server else {
        // Opened across a cut: accepted, then silence; closed at the heal.
        let (mut r, _w) = client.into_split();
        let mut buf = vec![0u8; CHUNK];
        loop {
            tokio::select! {
                n = r.read(&mut buf) => match n {
                    Ok(0) | Err(_) => return,
                    Ok(n) => { link.counters.discarded.fetch_add(n as u64, Ordering::Relaxed); }
                },
                changed = version.changed() => {
                    if changed.is_err() || !net.is_cut(&p) { return; }
                }
            }
        }
    };
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pump(cr, sw, link.clone(), net.clone(), lost.clone());
    let down = pump(sr, cw, link.clone(), net.clone(), lost.clone());
    // A heal closes a connection that lost bytes to a cut (its stream has a gap).
    let healed = async {
        loop {
            if version.changed().await.is_err() {
                return std::future::pending::<()>().await;
            }
            if lost.load(Ordering::Relaxed) && !net.is_cut(&p) {
                return;
            }
        }
    };
    tokio::select! {
        _ = async { tokio::join!(up, down) } => {}
        () = healed => {}
    }
}

/// One direction: reads `r`, writes each chunk to `w` when it is due. Across a cut it
/// discards what it reads and what was still queued, and forwards no end of stream; a
/// connection that lost bytes ends once its link is healed (its stream has a gap).
async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    link: Arc<Link>,
    net: Arc<Net>,
    lost: Arc<AtomicBool>,
) {
    // Bounded: a slow receiver slows the sender down, as TCP's flow control would.
    let (tx, mut rx) = mpsc::channel::<Item>(QUEUE);
    let p = link.pair();
    let reader = {
        let link = link.clone();
        let lost = lost.clone();
        let net = net.clone();
        let p = p.clone();
        async move {
            let mut buf = vec![0u8; CHUNK];
            let mut last = Instant::now();
            loop {
                let n = r.read(&mut buf).await.unwrap_or(0);
                let now = Instant::now();
                if net.lose_if_cut(&p, &lost) {
                    link.counters
                        .discarded
                        .fetch_add(n as u64, Ordering::Relaxed);
                    if n == 0 || !net.is_cut(&p) {
                        return; // no FIN across a cut; healed: the gap ends the connection
                    }
                    continue;
                }
                if n == 0 {
                    let _ = tx.send(Item::Eof(link.due(now, last))).await;
                    return;
                }
                last = link.due(now, last);
                if tx.send(Item::Data(last, buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
        }
    };
    let writer = async {
        while let Some(item) = rx.recv().await {
            match item {
                Item::Data(due, bytes) => {
                    tokio::time::sleep_until(due).await;
                    if net.lose_if_cut(&p, &lost) {
                        link.counters
                            .discarded
                            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                        continue;
                    }
                    if w.write_all(&bytes).await.is_err() {
                        return;
                    }
                    link.counters
                        .bytes
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                }
                Item::Eof(due) => {
                    tokio::time::sleep_until(due).await;
                    if !net.lose_if_cut(&p, &lost) {
                        let _ = w.shutdown().await;
                    }
                    return;
                }
            }
        }
    };
    tokio::join!(reader, writer);
}

async fn control(listener: TcpListener, net: Arc<Net>, links: Arc<Vec<Arc<Link>>>) {
    loop {
        let Ok((s, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let net = net.clone();
        let links = links.clone();
        tokio::spawn(async move {
            let (r, mut w) = s.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let answer = net.command(line.trim(), &links);
                if w.write_all(format!("{answer}\n").as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Binds every listener and the control port, then serves them until the process ends.
/// Returns once all are bound, with the addresses bound.
async fn start(config: Config) -> Result<Bound, String> {
    let regions: BTreeSet<String> = config
        .links
        .iter()
        .flat_map(|l| [l.from.clone(), l.to.clone()])
        .collect();
    let net = Arc::new(Net {
        cut: Mutex::new(BTreeSet::new()),
        version: watch::channel(0).0,
        regions,
    });
    let mut listeners = Vec::new();
    let mut links = Vec::new();
    let mut bound = Vec::new();
    for mut spec in config.links {
        if !(0.0..=1.0).contains(&spec.loss) || spec.delay_ms < 0.0 || spec.jitter_ms < 0.0 {
            return Err(format!(
                "link {}: delay, jitter and loss must be >= 0 (loss <= 1)",
                spec.listen
            ));
        }
        let l = TcpListener::bind(&spec.listen)
            .await
            .map_err(|e| format!("binding {}: {e}", spec.listen))?;
        // Port 0 picks a free port: the answer says which.
        spec.listen = l
            .local_addr()
            .map_err(|e| format!("{}: {e}", spec.listen))?
            .to_string();
        bound.push(spec.listen.clone());
        listeners.push(l);
        links.push(Arc::new(Link {
            spec,
            counters: Counters::default(),
        }));
    }
    let control_listener = TcpListener::bind(&config.control)
        .await
        .map_err(|e| format!("binding the control port {}: {e}", config.control))?;
    let control_addr = control_listener
        .local_addr()
        .map_err(|e| format!("control port: {e}"))?;
    for (listener, link) in listeners.into_iter().zip(links.iter().cloned()) {
        let net = net.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((s, _)) => {
                        tokio::spawn(carry(s, link.clone(), net.clone()));
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        });
    }
    tokio::spawn(control(control_listener, net, Arc::new(links)));
    Ok(Bound {
        control: control_addr,
        links: bound,
    })
}

/// Where the simulator listens, once [`start`] bound everything.
struct Bound {
    control: SocketAddr,
    /// Each link's listen address, in the order of the configuration.
    links: Vec<String>,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = match args.as_slice() {
        [_, flag, path] if flag == "--config" => path.clone(),
        _ => {
            eprintln!("usage: kubbi-netsim --config FILE   (see cluster/netsim/main.rs)");
            std::process::exit(2);
        }
    };
    let config: Config = match std::fs::read_to_string(&path)
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kubbi-netsim: {path}: {e}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(async {
        match start(config).await {
            Ok(b) => println!(
                "ready {}",
                serde_json::json!({"control": b.control.to_string(), "links": b.links})
            ),
            Err(e) => {
                eprintln!("kubbi-netsim: {e}");
                std::process::exit(1);
            }
        }
        std::future::pending::<()>().await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on an ephemeral port.
    async fn echo() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn sim(target: SocketAddr, delay_ms: f64, loss: f64) -> (String, SocketAddr) {
        let b = start(Config {
            control: "127.0.0.1:0".into(),
            links: vec![LinkSpec {
                listen: "127.0.0.1:0".into(),
                target: target.to_string(),
                from: "eu".into(),
                to: "us".into(),
                delay_ms,
                jitter_ms: delay_ms / 10.0,
                loss,
            }],
        })
        .await
        .expect("start");
        (b.links[0].clone(), b.control)
    }

    /// The link's counters, from `status`.
    async fn counters(control: SocketAddr) -> serde_json::Value {
        let status = say(control, "status").await;
        let v: serde_json::Value =
            serde_json::from_str(status.trim_start_matches("ok ")).expect("json");
        v["links"][0].clone()
    }

    async fn say(control: SocketAddr, line: &str) -> String {
        let s = TcpStream::connect(control).await.expect("control");
        let (r, mut w) = s.into_split();
        w.write_all(format!("{line}\n").as_bytes())
            .await
            .expect("write");
        let mut lines = BufReader::new(r).lines();
        lines.next_line().await.expect("read").expect("a line")
    }

    async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> Duration {
        let t = Instant::now();
        s.write_all(msg).await.expect("write");
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).await.expect("echo");
        assert_eq!(back, msg, "bytes arrive intact and in order");
        t.elapsed()
    }

    #[tokio::test]
    async fn every_round_trip_through_a_link_takes_at_least_twice_its_delay() {
        let (listen, _) = sim(echo().await, 30.0, 0.0).await;
        let mut s = TcpStream::connect(&listen).await.expect("connect");
        for i in 0..5u8 {
            let msg: Vec<u8> = (0..1000u32).map(|j| (j as u8) ^ i).collect();
            let rtt = round_trip(&mut s, &msg).await;
            // delay 30 ± 3 ms each way
            assert!(rtt >= Duration::from_millis(54), "round trip {rtt:?}");
        }
    }

    #[tokio::test]
    async fn a_lossy_link_still_delivers_every_byte_in_order() {
        let (listen, control) = sim(echo().await, 1.0, 0.3).await;
        let mut s = TcpStream::connect(&listen).await.expect("connect");
        for i in 0..20u8 {
            let msg = vec![i; 3000];
            round_trip(&mut s, &msg).await;
        }
        let c = counters(control).await;
        assert!(c["lost"].as_u64().expect("lost") > 0, "{c}");
    }

    #[tokio::test]
    async fn a_cut_is_silence_and_the_heal_closes_what_lost_bytes() {
        let (listen, control) = sim(echo().await, 1.0, 0.0).await;
        let mut before = TcpStream::connect(&listen).await.expect("connect");
        round_trip(&mut before, b"hello").await;
        assert_eq!(say(control, "cut eu").await, "ok cut=1");
        assert!(
            say(control, "cut mars")
                .await
                .starts_with("error: unknown region")
        );
        // Silence: what is sent across the cut is not answered (nor refused).
        before.write_all(b"lost").await.expect("write");
        let mut buf = [0u8; 4];
        let waited = tokio::time::timeout(Duration::from_millis(300), before.read(&mut buf)).await;
        assert!(waited.is_err(), "nothing crosses a cut: {waited:?}");
        let mut during = TcpStream::connect(&listen)
            .await
            .expect("accepted while cut");
        during.write_all(b"x").await.expect("write");
        // Heal only once the simulator has taken both connections and the byte sent across.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let c = counters(control).await;
            if c["connections"] == 2 && c["discarded"].as_u64() >= Some(5) {
                break;
            }
            assert!(Instant::now() < deadline, "{c}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(say(control, "heal").await, "ok cut=0");
        // Both connections lost bytes: the heal closes them.
        for s in [&mut before, &mut during] {
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .expect("closed at the heal");
            assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        }
        let mut after = TcpStream::connect(&listen).await.expect("connect");
        round_trip(&mut after, b"again").await;
    }
}

//! `beep-sfu-loadgen`: simulates many talking participants against a running
//! beep-sfu through the real protocol (WebSocket offer/answer, `POST /join`,
//! ICE/DTLS/SRTP over UDP), all on one `mio` loop, and measures what the
//! server sustains: packets/s, loss, one-way latency, the server's CPU per
//! forwarded packet and memory per participant. `relay` and `baseline` run
//! the same traffic through a bare UDP fan-out relay (no crypto, no WebRTC):
//! the machine's floor, measured the same way.
//!
//! Pin the server and the generator to different cores, e.g.
//! `taskset -c 0 beep-sfu --dev …` and `taskset -c 1 beep-sfu-loadgen run …`.

mod lifecycle;
mod outcome;
mod participant;
mod probe;
mod relay;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use mio::{Events, Interest, Poll, Token};

use outcome::{multiset_minus, percentile, report, room_sizes, summarise, Outcome};
use participant::{Placement, Tally, UdpParticipant, WebRtcParticipant, Window};

/// Packets per second per talker (20 ms Opus frames).
const PPS: u64 = 50;
/// Send phases per 20 ms period: participants are spread over them so the
/// server does not see everyone's packet in the same instant.
const PHASES: u64 = 20;

#[derive(Parser)]
#[command(
    name = "beep-sfu-loadgen",
    about = "Load generator and bare-UDP baseline for beep-sfu"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// One run of P participants against beep-sfu.
    Run(RunArgs),
    /// Raise P step by step until loss > 0.5 %, p99 > 20 ms or server CPU > 95 %.
    Ramp {
        #[command(flatten)]
        run: RunArgs,
        /// Participants added per step.
        #[arg(long, default_value_t = 40)]
        step: usize,
        /// Stop after this many participants.
        #[arg(long, default_value_t = 4000)]
        max: usize,
    },
    /// P clients connecting at once (as after a restart), retrying 503 and
    /// close 1013; reports the time until all are connected, then measures
    /// a talking window.
    Storm {
        #[command(flatten)]
        run: RunArgs,
        /// Signalling threads (clients signalling at the same moment).
        #[arg(long, default_value_t = 128)]
        threads: usize,
    },
    /// Cycles of P clients that connect at once, join, talk and leave (half
    /// say goodbye, half vanish); reports the server's RSS, fds and gauges.
    Churn {
        #[command(flatten)]
        run: RunArgs,
        /// Signalling threads.
        #[arg(long, default_value_t = 128)]
        threads: usize,
        /// Cycles.
        #[arg(long, default_value_t = 20)]
        cycles: u32,
        /// Longest wait for the server's peers and conversations to drain
        /// after a cycle (run the server with a short --membership-grace-secs).
        #[arg(long, default_value_t = 90)]
        drain_secs: u64,
    },
    /// P participants held for MINUTES, one measured window a minute.
    Soak {
        #[command(flatten)]
        run: RunArgs,
        /// Signalling threads for the arrival.
        #[arg(long, default_value_t = 32)]
        threads: usize,
        /// Minutes to hold the load.
        #[arg(long, default_value_t = 30)]
        minutes: u32,
    },
    /// The bare UDP fan-out relay (the baseline's server side).
    Relay {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:40000")]
        listen: SocketAddr,
    },
    /// The same traffic as `run`, over plain UDP through `relay`.
    Baseline {
        /// The relay's address.
        #[arg(long, default_value = "127.0.0.1:40000")]
        relay: SocketAddr,
        /// The relay's pid (for its CPU).
        #[arg(long)]
        relay_pid: Option<u32>,
        #[command(flatten)]
        shape: Shape,
    },
}

#[derive(Args, Clone)]
struct Shape {
    /// Participants.
    #[arg(long, short = 'p', default_value_t = 40)]
    participants: usize,
    /// Conversation size.
    #[arg(long, short = 'r', default_value_t = 4)]
    room_size: usize,
    /// Share of participants talking at once (1.0 = all, the worst case).
    #[arg(long, default_value_t = 1.0)]
    talkers: f64,
    /// Seconds of warm-up before measuring.
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// Seconds measured.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Local IP the participants bind to.
    #[arg(long, default_value = "127.0.0.1")]
    bind_ip: IpAddr,
    /// Write the results as JSON here too.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// How participants are placed on the nodes of a cluster.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Spread {
    /// Members of one room alternate between nodes (everything crosses).
    Members,
    /// Whole rooms alternate between nodes (nothing crosses).
    Rooms,
}

#[derive(Args, Clone)]
struct RunArgs {
    /// The server's HTTP address; repeat it for each node of a cluster.
    #[arg(long, default_value = "127.0.0.1:8080")]
    server: Vec<SocketAddr>,
    /// The server's pid (for its CPU and RSS); repeat it for each node.
    #[arg(long)]
    server_pid: Vec<u32>,
    /// With several --server: how participants are spread over the nodes.
    #[arg(long, value_enum, default_value_t = Spread::Members)]
    spread: Spread,
    /// Audio m-lines each participant offers (slots it can hear at once);
    /// default: room size − 1, so everyone hears everyone.
    #[arg(long)]
    slots: Option<usize>,
    /// Share of participants that reach the server over ICE-TCP only
    /// (0.0 = all UDP, 1.0 = all TCP).
    #[arg(long, default_value_t = 0.0)]
    tcp_share: f64,
    #[command(flatten)]
    shape: Shape,
}

impl RunArgs {
    /// Where participants are placed over the nodes.
    fn placement(&self) -> Placement {
        Placement {
            nodes: self.server.len(),
            room_size: self.shape.room_size,
            by_room: self.spread == Spread::Rooms,
        }
    }

    /// Participant `i`'s node's HTTP address.
    fn http_of(&self, i: usize) -> SocketAddr {
        self.server[self.placement().node_of(i as u32) % self.server.len()]
    }

    /// CPU seconds of every node, summed (`None` without pids).
    fn cpu(&self) -> Option<f64> {
        sum(self.server_pid.iter().map(|p| probe::cpu_seconds(*p)))
    }

    /// RSS of every node, summed.
    fn rss(&self) -> Option<u64> {
        let v: Option<Vec<u64>> = self
            .server_pid
            .iter()
            .map(|p| probe::rss_bytes(*p))
            .collect();
        v.filter(|v| !v.is_empty()).map(|v| v.iter().sum())
    }

    /// A metric family summed over every node.
    fn metric(&self, name: &str) -> Option<f64> {
        sum(self.server.iter().map(|s| probe::metric(*s, name)))
    }
}

/// The sum, if every part is known and there is at least one.
fn sum(parts: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let v: Option<Vec<f64>> = parts.collect();
    v.filter(|v| !v.is_empty()).map(|v| v.iter().sum())
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Run(a) => run(&a).map(|r| report(&[r], a.shape.json.as_deref())),
        Cmd::Ramp { run: a, step, max } => ramp(&a, step, max),
        Cmd::Storm { run: a, threads } => lifecycle::storm(&a, threads),
        Cmd::Churn {
            run: a,
            threads,
            cycles,
            drain_secs,
        } => lifecycle::churn(&a, threads, cycles, drain_secs),
        Cmd::Soak {
            run: a,
            threads,
            minutes,
        } => lifecycle::soak(&a, threads, minutes),
        Cmd::Relay { listen } => relay::serve(listen).map_err(|e| e.to_string()),
        Cmd::Baseline {
            relay,
            relay_pid,
            shape,
        } => baseline(relay, relay_pid, &shape).map(|r| report(&[r], shape.json.as_deref())),
    };
    if let Err(e) = result {
        eprintln!("beep-sfu-loadgen: {e}");
        std::process::exit(1);
    }
}

/// Anything the loop drives.
trait Endpoint {
    fn register(&mut self, registry: &mio::Registry, token: Token) -> std::io::Result<()>;
    fn readable(&mut self, epoch: Instant, w: Option<Window>);
    fn tick(&mut self, epoch: Instant, w: Option<Window>, talk: bool);
}

/// Both participant kinds have the same `on_*` methods.
macro_rules! endpoint {
    ($($t:ty: $s:ident => $reg:expr),*) => {$(
        impl Endpoint for $t {
            fn register(&mut self, registry: &mio::Registry, token: Token) -> std::io::Result<()> {
                let $s = self;
                $reg(registry, token)
            }
            fn readable(&mut self, epoch: Instant, w: Option<Window>) {
                self.on_readable(epoch, w)
            }
            fn tick(&mut self, epoch: Instant, w: Option<Window>, talk: bool) {
                self.on_tick(epoch, w, talk)
            }
        }
    )*};
}

endpoint!(
    WebRtcParticipant: p => |r, t| p.link.register(r, t),
    UdpParticipant: p => |r: &mio::Registry, t| r.register(&mut p.socket, t, Interest::READABLE)
);

/// The one event loop of the generator.
struct Driver {
    poll: Poll,
    events: Events,
    epoch: Instant,
    next_phase: Instant,
    phase: u64,
    window: Option<Window>,
}

impl Driver {
    fn new() -> Result<Self, String> {
        let now = Instant::now();
        Ok(Driver {
            poll: Poll::new().map_err(|e| e.to_string())?,
            events: Events::with_capacity(1024),
            epoch: now,
            next_phase: now,
            phase: 0,
            window: None,
        })
    }

    fn register<E: Endpoint>(&self, e: &mut E, i: usize) -> Result<(), String> {
        e.register(self.poll.registry(), Token(i))
            .map_err(|e| e.to_string())
    }

    /// Drives every endpoint until `until`; participant `i` talks if `talk(i)`.
    fn drive<E: Endpoint>(&mut self, ps: &mut [E], until: Instant, talk: &dyn Fn(usize) -> bool) {
        let period = Duration::from_millis(1000 / PPS) / PHASES as u32;
        while Instant::now() < until {
            let timeout = self.next_phase.saturating_duration_since(Instant::now());
            let _ = self.poll.poll(&mut self.events, Some(timeout));
            for ev in self.events.iter() {
                if let Some(p) = ps.get_mut(ev.token().0) {
                    p.readable(self.epoch, self.window);
                }
            }
            let now = Instant::now();
            if now >= self.next_phase {
                let phase = self.phase % PHASES;
                for (i, p) in ps.iter_mut().enumerate() {
                    if i as u64 % PHASES == phase {
                        p.tick(self.epoch, self.window, talk(i));
                    }
                }
                self.phase += 1;
                self.next_phase += period;
                if now > self.next_phase + Duration::from_millis(100) {
                    // We fell behind (overloaded generator): do not burst to catch up.
                    self.next_phase = now + period;
                }
            }
        }
    }

    fn ns(&self, t: Instant) -> u64 {
        t.duration_since(self.epoch).as_nanos() as u64
    }
}

fn talk_fn(shape: &Shape) -> impl Fn(usize) -> bool {
    let talkers = (shape.participants as f64 * shape.talkers.clamp(0.0, 1.0)).round() as usize;
    move |i| i < talkers
}

fn run(a: &RunArgs) -> Result<Outcome, String> {
    let mut d = Driver::new()?;
    let mut ps = Vec::new();
    let idle_rss = a.rss();
    let tag = lifecycle::run_tag();
    add_participants(&mut d, &mut ps, a, a.shape.participants, &tag)?;
    let o = measure(&mut d, &mut ps, a, idle_rss);
    lifecycle::goodbye(&mut d, &mut ps);
    o
}

fn ramp(a: &RunArgs, step: usize, max: usize) -> Result<(), String> {
    let mut d = Driver::new()?;
    let mut ps: Vec<WebRtcParticipant> = Vec::new();
    let idle_rss = a.rss();
    let mut results = Vec::new();
    let mut last_good = None;
    let tag = lifecycle::run_tag();
    while ps.len() + step <= max {
        let mut step_args = a.clone();
        step_args.shape.participants = ps.len() + step;
        add_participants(&mut d, &mut ps, &step_args, step, &tag)?;
        let o = measure(&mut d, &mut ps, &step_args, idle_rss)?;
        eprintln!(
            "P={:5}  out {:8.0} pps  cpu {:5.1}%  loss {:6.3}%  p99 {:6.2} ms",
            o.participants,
            o.pps_out,
            o.cpu_percent.unwrap_or(0.0),
            o.loss_percent,
            o.latency_ms_p99
        );
        let good = o.loss_percent <= 0.5
            && o.latency_ms_p99 <= 20.0
            && o.cpu_percent.unwrap_or(0.0) <= 95.0;
        results.push(o.clone());
        if !good {
            break;
        }
        last_good = Some(o.participants);
    }
    lifecycle::goodbye(&mut d, &mut ps);
    report(&results, a.shape.json.as_deref());
    println!(
        "last good P: {}",
        last_good.map(|p| p.to_string()).unwrap_or("none".into())
    );
    Ok(())
}

/// Signals, connects and joins `n` more participants, one at a time.
fn add_participants(
    d: &mut Driver,
    ps: &mut Vec<WebRtcParticipant>,
    a: &RunArgs,
    n: usize,
    tag: &str,
) -> Result<(), String> {
    let slots = a
        .slots
        .unwrap_or(a.shape.room_size.saturating_sub(1).max(1));
    let talk = talk_fn(&a.shape);
    for _ in 0..n {
        let i = ps.len();
        let room = i / a.shape.room_size.max(1);
        let user = format!("load-{tag}-u{i}");
        let tcp = (i as f64) < a.tcp_share.clamp(0.0, 1.0) * a.shape.participants as f64;
        let mut p =
            WebRtcParticipant::signal(i as u32, a.http_of(i), &user, slots, a.shape.bind_ip, tcp)
                .map_err(|e| format!("participant {i}: {e}"))?;
        p.placement = a.placement();
        d.register(&mut p, i)?;
        ps.push(p);
        // Keep everyone flowing while this one connects.
        let end = Instant::now() + Duration::from_secs(10);
        while ps[i].connected_at.is_none() && Instant::now() < end {
            let until = Instant::now() + Duration::from_millis(2);
            d.drive(ps, until, &talk);
            // Let a fresh participant's handshake progress between phases.
            ps[i].on_tick(d.epoch, None, false);
        }
        if ps[i].connected_at.is_none() {
            return Err(format!("participant {i} did not connect within 10 s"));
        }
        WebRtcParticipant::join(
            a.http_of(i),
            &user,
            i as u32,
            &format!("load-{tag}-room-{room}"),
        )
        .map_err(|e| format!("participant {i}: {e}"))?;
    }
    Ok(())
}

fn measure(
    d: &mut Driver,
    ps: &mut [WebRtcParticipant],
    a: &RunArgs,
    idle_rss: Option<u64>,
) -> Result<Outcome, String> {
    let talk = talk_fn(&a.shape);
    let warm = Instant::now() + Duration::from_secs(a.shape.warmup);
    d.drive(ps, warm, &talk);
    for p in ps.iter_mut() {
        p.tally = Tally::default();
    }
    let start = Instant::now();
    let end = start + Duration::from_secs(a.shape.duration);
    d.window = Some(Window {
        from_ns: d.ns(start),
        to_ns: d.ns(end),
    });
    let cpu0 = a.cpu();
    let gen0 = probe::cpu_seconds(std::process::id());
    let in0 = a.metric("beep_sfu_rtp_packets_in_total");
    let out0 = a.metric("beep_sfu_forwarded_packets_total");
    let relay0 = a.metric("beep_sfu_relay_packets_in_total");
    d.drive(ps, end, &talk);
    let cpu1 = a.cpu();
    let gen1 = probe::cpu_seconds(std::process::id());
    let in1 = a.metric("beep_sfu_rtp_packets_in_total");
    let out1 = a.metric("beep_sfu_forwarded_packets_total");
    let relay1 = a.metric("beep_sfu_relay_packets_in_total");
    let elapsed = start.elapsed().as_secs_f64();
    // Let packets sent at the end of the window arrive.
    d.drive(ps, Instant::now() + Duration::from_millis(500), &talk);
    d.window = None;
    let rss = a.rss();

    let mut setup: Vec<f64> = ps
        .iter()
        .filter_map(|p| {
            p.connected_at
                .map(|c| (c - p.started).as_secs_f64() * 1000.0)
        })
        .collect();
    setup.sort_by(f64::total_cmp);
    let hearers = a
        .slots
        .unwrap_or(a.shape.room_size.saturating_sub(1))
        .min(a.shape.room_size.saturating_sub(1));
    let forwarded = out1.zip(out0).map(|(b, a)| b - a).unwrap_or(0.0);
    let cpu = cpu1.zip(cpu0).map(|(b, a)| b - a);
    let mut o = summarise(
        "beep-sfu",
        ps.iter_mut().map(|p| p.tally.clone()).collect(),
        &a.shape,
        ps.len(),
        hearers,
        room_sizes(ps.len(), a.shape.room_size),
        elapsed,
        (in1.zip(in0).map(|(b, a)| b - a).unwrap_or(0.0), forwarded),
        cpu,
        Some(&setup),
        rss.zip(idle_rss)
            .map(|(r, i)| r.saturating_sub(i) as f64 / 1024.0 / ps.len().max(1) as f64),
    );
    o.generator_cpu_percent = gen1.zip(gen0).map(|(b, a)| (b - a) / elapsed * 100.0);
    o.rss_kib = rss.map(|r| r as f64 / 1024.0);
    if a.server.len() > 1 {
        let (mut cross, mut all): (Vec<u32>, Vec<u32>) = (Vec::new(), Vec::new());
        for p in ps.iter() {
            cross.extend_from_slice(&p.tally.cross_latencies_us);
            all.extend_from_slice(&p.tally.latencies_us);
        }
        let mut same = multiset_minus(all, &cross);
        cross.sort_unstable();
        same.sort_unstable();
        let p = |v: &[u32]| (!v.is_empty()).then(|| (percentile(v, 0.5), percentile(v, 0.99)));
        o.cross_ms = p(&cross);
        o.same_ms = p(&same);
        o.relay_pps_in = relay1.zip(relay0).map(|(b, a)| (b - a) / elapsed);
    }
    Ok(o)
}

fn baseline(relay: SocketAddr, relay_pid: Option<u32>, shape: &Shape) -> Result<Outcome, String> {
    let mut d = Driver::new()?;
    let mut ps = Vec::new();
    for i in 0..shape.participants {
        let room = (i / shape.room_size.max(1)) as u32;
        let mut p =
            UdpParticipant::new(i as u32, room, relay, shape.bind_ip).map_err(|e| e.to_string())?;
        d.register(&mut p, i)?;
        ps.push(p);
    }
    let talk = talk_fn(shape);
    d.drive(
        &mut ps,
        Instant::now() + Duration::from_secs(shape.warmup),
        &talk,
    );
    for p in ps.iter_mut() {
        p.tally = Tally::default();
    }
    let start = Instant::now();
    let end = start + Duration::from_secs(shape.duration);
    d.window = Some(Window {
        from_ns: d.ns(start),
        to_ns: d.ns(end),
    });
    let cpu0 = relay_pid.and_then(probe::cpu_seconds);
    let gen0 = probe::cpu_seconds(std::process::id());
    d.drive(&mut ps, end, &talk);
    let cpu1 = relay_pid.and_then(probe::cpu_seconds);
    let gen1 = probe::cpu_seconds(std::process::id());
    let elapsed = start.elapsed().as_secs_f64();
    d.drive(&mut ps, Instant::now() + Duration::from_millis(500), &talk);
    for p in &ps {
        p.leave();
    }
    let tallies: Vec<Tally> = ps.iter().map(|p| p.tally.clone()).collect();
    let sent: f64 = tallies.iter().map(|t| t.sent_in_window as f64).sum();
    let received: f64 = tallies.iter().map(|t| t.received_in_window as f64).sum();
    let mut o = summarise(
        "bare-udp-relay",
        tallies,
        shape,
        ps.len(),
        shape.room_size.saturating_sub(1),
        room_sizes(ps.len(), shape.room_size),
        elapsed,
        (sent, received),
        cpu1.zip(cpu0).map(|(b, a)| b - a),
        None,
        None,
    );
    o.generator_cpu_percent = gen1.zip(gen0).map(|(b, a)| (b - a) / elapsed * 100.0);
    Ok(o)
}

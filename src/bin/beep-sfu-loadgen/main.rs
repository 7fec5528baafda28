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
mod runs;
mod udp_participant;
mod voice;

use runs::{baseline, ramp, run};

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use mio::{Events, Interest, Poll, Token};

use outcome::{multiset_minus, percentile, report, room_sizes, summarise, Outcome};
use participant::{Placement, Tally, WebRtcParticipant, Window};
use udp_participant::UdpParticipant;
use voice::{Load, Voice};

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
    /// Which load: everyone talking (the worst case), conversations taking
    /// turns with DTX in silence, or one large room of 10 talkers and
    /// one-slot listeners (room size and slots are then set for it).
    #[arg(long, value_enum, default_value_t = Load::Everyone)]
    load: Load,
    /// Share of participants talking at once with `--load everyone`
    /// (1.0 = all, the worst case).
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

/// A large room is one room of everyone, each listening on one slot.
fn fit_load(shape: &mut Shape, slots: Option<&mut Option<usize>>) {
    if shape.load == Load::LargeRoom {
        shape.room_size = LARGE_ROOM_SIZE;
        if let Some(s) = slots {
            *s = Some(1);
        }
    }
}

/// The room size standing for "one room of everyone".
const LARGE_ROOM_SIZE: usize = 1_000_000;

fn main() {
    let mut cli = Cli::parse();
    match &mut cli.cmd {
        Cmd::Run(a) | Cmd::Ramp { run: a, .. } => fit_load(&mut a.shape, Some(&mut a.slots)),
        Cmd::Baseline { shape, .. } => fit_load(shape, None),
        _ => {}
    }
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
    fn tick(&mut self, epoch: Instant, w: Option<Window>, voice: Voice);
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
            fn tick(&mut self, epoch: Instant, w: Option<Window>, voice: Voice) {
                self.on_tick(epoch, w, voice)
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

    /// Drives every endpoint until `until`; participant `i` sends what
    /// `voice(i, now)` says.
    fn drive<E: Endpoint>(
        &mut self,
        ps: &mut [E],
        until: Instant,
        voice: &dyn Fn(usize, Instant) -> Voice,
    ) {
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
                        p.tick(self.epoch, self.window, voice(i, now));
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

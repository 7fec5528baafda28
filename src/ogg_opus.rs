//! Packs Opus packets into a self-contained Ogg Opus file (RFC 7845):
//! an `OpusHead` page, an `OpusTags` page, then audio pages whose granule
//! positions follow the packets' RTP timestamps (48 kHz), so gaps from lost
//! packets keep the timeline right. Page framing and CRCs come from the
//! `ogg` crate.

use ogg::writing::{PacketWriteEndInfo, PacketWriter};

/// Opus's RTP clock rate and sample rate: 48 kHz whatever the codec bandwidth.
pub const CLOCK_RATE: u32 = 48_000;
/// RTP ticks (samples) per millisecond.
pub const TICKS_PER_MS: u64 = CLOCK_RATE as u64 / 1000;
/// One 20 ms frame, the usual Opus packet, in RTP ticks.
pub const FRAME_TICKS: u32 = 960;

/// Samples a decoder skips at the start (libopus' encoder lookahead at 48 kHz).
pub const PRE_SKIP: u16 = 312;
/// Audio packets per Ogg page (about one second of 20 ms packets).
const PACKETS_PER_PAGE: usize = 50;
/// Vendor string in `OpusTags`.
const VENDOR: &str = concat!("beep-sfu ", env!("CARGO_PKG_VERSION"));

/// One Opus packet and its RTP timestamp relative to the first packet.
#[derive(Debug, Clone, Copy)]
pub struct TimedPacket<'a> {
    /// 48 kHz ticks since the first packet of the file.
    pub offset: u64,
    /// The Opus packet.
    pub data: &'a [u8],
}

/// Duration of an Opus packet in 48 kHz samples, from its TOC byte
/// (RFC 6716 section 3.1). `None` for an empty or malformed packet.
pub fn packet_samples(packet: &[u8]) -> Option<u32> {
    let toc = *packet.first()?;
    let config = toc >> 3;
    let frame: u32 = match config {
        0..=11 => [480, 960, 1920, 2880][(config % 4) as usize], // SILK: 10/20/40/60 ms
        12..=15 => [480, 960][(config % 2) as usize],            // Hybrid: 10/20 ms
        _ => [120, 240, 480, 960][(config % 4) as usize],        // CELT: 2.5/5/10/20 ms
    };
    let frames: u32 = match toc & 0x3 {
        0 => 1,
        1 | 2 => 2,
        _ => u32::from(*packet.get(1)? & 0x3f),
    };
    let total = frame * frames;
    // RFC 6716: a packet holds at most 120 ms.
    (frames > 0 && total <= 5760).then_some(total)
}

/// True if the packet's TOC says stereo.
pub fn is_stereo(packet: &[u8]) -> bool {
    packet.first().is_some_and(|t| t & 0x4 != 0)
}

/// The `OpusHead` identification header.
pub fn opus_head(channels: u8) -> Vec<u8> {
    let mut h = Vec::with_capacity(19);
    h.extend_from_slice(b"OpusHead");
    h.push(1); // version
    h.push(channels);
    h.extend_from_slice(&PRE_SKIP.to_le_bytes());
    h.extend_from_slice(&CLOCK_RATE.to_le_bytes()); // input sample rate (informational)
    h.extend_from_slice(&0i16.to_le_bytes()); // output gain
    h.push(0); // channel mapping family 0: mono or stereo
    h
}

/// The `OpusTags` comment header (vendor only).
pub fn opus_tags() -> Vec<u8> {
    let mut t = Vec::with_capacity(16 + VENDOR.len());
    t.extend_from_slice(b"OpusTags");
    t.extend_from_slice(&(VENDOR.len() as u32).to_le_bytes());
    t.extend_from_slice(VENDOR.as_bytes());
    t.extend_from_slice(&0u32.to_le_bytes());
    t
}

/// Writes the packets as one Ogg Opus logical stream with the given serial.
/// Packets must be in increasing `offset` order. An empty list still gives a
/// valid (silent) file.
pub fn encode(packets: &[TimedPacket<'_>], serial: u32) -> Vec<u8> {
    let bytes: usize = packets.iter().map(|p| p.data.len()).sum();
    let mut out = Vec::with_capacity(
        bytes + 64 + packets.len() * 2 + (packets.len() / PACKETS_PER_PAGE + 3) * 27,
    );
    let channels = if packets.first().is_some_and(|p| is_stereo(p.data)) {
        2
    } else {
        1
    };
    {
        let mut w = PacketWriter::new(&mut out);
        // Writing into a Vec cannot fail.
        let _ = w.write_packet(opus_head(channels), serial, PacketWriteEndInfo::EndPage, 0);
        let last_header = if packets.is_empty() {
            PacketWriteEndInfo::EndStream
        } else {
            PacketWriteEndInfo::EndPage
        };
        let _ = w.write_packet(opus_tags(), serial, last_header, 0);
        for (i, p) in packets.iter().enumerate() {
            let samples = u64::from(packet_samples(p.data).unwrap_or(FRAME_TICKS));
            let granule = u64::from(PRE_SKIP) + p.offset + samples;
            let end = if i + 1 == packets.len() {
                PacketWriteEndInfo::EndStream
            } else if (i + 1) % PACKETS_PER_PAGE == 0 {
                PacketWriteEndInfo::EndPage
            } else {
                PacketWriteEndInfo::NormalPacket
            };
            let _ = w.write_packet(p.data.to_vec(), serial, end, granule);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ogg::reading::PacketReader;
    use std::io::Cursor;

    #[test]
    fn toc_durations() {
        assert_eq!(packet_samples(&[0xFC]), Some(960)); // CELT FB 20 ms, 1 frame
        assert_eq!(packet_samples(&[0x78]), Some(960)); // config 15 hybrid FB 20 ms
        assert_eq!(packet_samples(&[0x08]), Some(960)); // SILK NB 20 ms
        assert_eq!(packet_samples(&[0xFD]), Some(1920)); // two 20 ms frames
        assert_eq!(packet_samples(&[0xFF, 0x03]), Some(2880)); // code 3, three frames
        assert_eq!(packet_samples(&[0xFF, 0x00]), None);
        assert_eq!(packet_samples(&[0xFF, 0x3f]), None); // 63 frames: too long
        assert_eq!(packet_samples(&[]), None);
    }

    #[test]
    fn parses_back_with_headers_granules_and_crcs() {
        let payloads: Vec<Vec<u8>> = (0..120u8).map(|i| vec![0xF8, i, i, i]).collect();
        // Packet 60 was lost: offsets jump by two frames there.
        let packets: Vec<TimedPacket> = payloads
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 60)
            .map(|(i, d)| TimedPacket {
                offset: i as u64 * 960,
                data: d,
            })
            .collect();
        let file = encode(&packets, 42);
        // The ogg reader checks every page CRC.
        let mut r = PacketReader::new(Cursor::new(file));
        let head = r.read_packet_expected().unwrap();
        assert_eq!(&head.data[..8], b"OpusHead");
        assert_eq!(head.data[8], 1);
        assert_eq!(head.data[9], 1, "mono");
        assert_eq!(u16::from_le_bytes([head.data[10], head.data[11]]), PRE_SKIP);
        assert_eq!(
            u32::from_le_bytes([head.data[12], head.data[13], head.data[14], head.data[15]]),
            48_000
        );
        assert_eq!(head.stream_serial(), 42);
        assert!(head.last_in_page());
        let tags = r.read_packet_expected().unwrap();
        assert_eq!(&tags.data[..8], b"OpusTags");
        let mut got = Vec::new();
        let mut last = None;
        while let Some(p) = r.read_packet().unwrap() {
            if p.last_in_page() {
                last = Some((p.absgp_page(), p.last_in_stream(), got.len()));
            }
            got.push(p.data);
        }
        let want: Vec<Vec<u8>> = packets.iter().map(|p| p.data.to_vec()).collect();
        assert_eq!(got, want);
        let (granule, eos, _) = last.unwrap();
        assert!(eos, "end-of-stream page");
        // Last packet is #119: offset 119*960, plus its own 960, plus pre-skip.
        assert_eq!(granule, u64::from(PRE_SKIP) + 120 * 960);
    }

    #[test]
    fn empty_is_still_a_valid_stream() {
        let file = encode(&[], 7);
        let mut r = PacketReader::new(Cursor::new(file));
        assert_eq!(&r.read_packet_expected().unwrap().data[..8], b"OpusHead");
        let tags = r.read_packet_expected().unwrap();
        assert!(tags.last_in_stream());
        assert!(r.read_packet().unwrap().is_none());
    }
}

//! Packs Opus packets into a self-contained Ogg Opus file (RFC 7845):
//! an `OpusHead` page, an `OpusTags` page, then audio pages whose granule
//! positions follow the packets' RTP timestamps (48 kHz), so gaps from lost
//! packets keep the timeline right. Page framing and CRCs come from the
//! `ogg` crate.

use ogg::writing::{PacketWriteEndInfo, PacketWriter};

use crate::sfu::opus::{is_stereo, packet_samples, TimedPacket, CLOCK_RATE, FRAME_TICKS};

/// Samples a decoder skips at the start (libopus' encoder lookahead at 48 kHz).
pub const PRE_SKIP: u16 = 312;
/// Audio packets per Ogg page (about one second of 20 ms packets).
const PACKETS_PER_PAGE: usize = 50;
/// Vendor string in `OpusTags`.
const VENDOR: &str = concat!("beep-sfu ", env!("CARGO_PKG_VERSION"));

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

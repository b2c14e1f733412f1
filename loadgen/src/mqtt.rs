//! The few MQTT 3.1.1 packets the broker comparison needs, encoded and parsed on caller-owned
//! buffers (no I/O): CONNECT/CONNACK, SUBSCRIBE/SUBACK, PUBLISH at QoS 1 and its PUBACK,
//! DISCONNECT.
//!
//! ```text
//!  device (user U, device D): CONNECT "sb-U-D" (clean session, no keep-alive) ─► CONNACK
//!                             SUBSCRIBE "u/U" QoS 1 ─► SUBACK            (= connected)
//!  send to peer P:            PUBLISH "u/P" QoS 1 (payload as for Switchboard) ─► PUBACK (= ack)
//!  every device of P:         ◄─ PUBLISH "u/P" QoS 1 ─► PUBACK                  (= delivery)
//! ```

use std::ops::Range;

pub const CONNECT: u8 = 1;
pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const SUBSCRIBE: u8 = 8;
pub const SUBACK: u8 = 9;
pub const PINGRESP: u8 = 13;
pub const DISCONNECT: u8 = 14;

/// Largest packet accepted from the broker (a full Switchboard-sized payload plus topic).
pub const PACKET_BYTES_MAX: usize = 128 * 1024;

/// The topic a user's devices subscribe to.
pub fn topic(user: u64) -> String {
    format!("u/{user}")
}

fn put_remaining_length(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Topics and client ids here are short ASCII; MQTT strings are at most 65535 bytes.
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// CONNECT with a clean session and keep-alive off (the run is bounded; no pings needed).
pub fn write_connect(out: &mut Vec<u8>, client_id: &str) {
    let mut body = Vec::with_capacity(16 + client_id.len());
    put_str(&mut body, "MQTT");
    body.push(4); // protocol level 3.1.1
    body.push(0x02); // clean session
    body.extend_from_slice(&0u16.to_be_bytes()); // keep-alive off
    put_str(&mut body, client_id);
    out.push(CONNECT << 4);
    put_remaining_length(out, body.len());
    out.extend_from_slice(&body);
}

pub fn write_subscribe_qos1(out: &mut Vec<u8>, packet_id: u16, topic: &str) {
    out.push((SUBSCRIBE << 4) | 0x02);
    put_remaining_length(out, 2 + 2 + topic.len() + 1);
    out.extend_from_slice(&packet_id.to_be_bytes());
    put_str(out, topic);
    out.push(1);
}

pub fn write_publish_qos1(out: &mut Vec<u8>, topic: &str, packet_id: u16, payload: &[u8]) {
    out.push((PUBLISH << 4) | 0x02);
    put_remaining_length(out, 2 + topic.len() + 2 + payload.len());
    put_str(out, topic);
    out.extend_from_slice(&packet_id.to_be_bytes());
    out.extend_from_slice(payload);
}

pub fn write_puback(out: &mut Vec<u8>, packet_id: u16) {
    out.push(PUBACK << 4);
    out.push(2);
    out.extend_from_slice(&packet_id.to_be_bytes());
}

pub fn write_disconnect(out: &mut Vec<u8>) {
    out.extend_from_slice(&[DISCONNECT << 4, 0]);
}

/// Where one complete packet sits in a buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PacketAt {
    pub kind: u8,
    pub flags: u8,
    pub body: Range<usize>,
    /// Fixed header plus body.
    pub len: usize,
}

/// The complete packet at the start of `buf`; `Ok(None)`: incomplete.
pub fn parse_packet(buf: &[u8]) -> Result<Option<PacketAt>, &'static str> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut len = 0usize;
    let mut shift = 0;
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << shift;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            return Err("remaining length over 4 bytes");
        }
    }
    if len > PACKET_BYTES_MAX {
        return Err("packet larger than the limit");
    }
    if buf.len() < i + len {
        return Ok(None);
    }
    Ok(Some(PacketAt {
        kind: buf[0] >> 4,
        flags: buf[0] & 0x0f,
        body: i..i + len,
        len: i + len,
    }))
}

/// A received PUBLISH: QoS, packet id (QoS > 0) and where the payload is in `body`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publish {
    pub qos: u8,
    pub packet_id: Option<u16>,
    pub payload: Range<usize>,
}

pub fn parse_publish(flags: u8, body: &[u8]) -> Result<Publish, &'static str> {
    let qos = (flags >> 1) & 0x03;
    if qos == 3 {
        return Err("PUBLISH with QoS 3");
    }
    if body.len() < 2 {
        return Err("PUBLISH without a topic");
    }
    let tlen = usize::from(u16::from_be_bytes([body[0], body[1]]));
    let mut at = 2 + tlen;
    let packet_id = if qos > 0 {
        let b = body.get(at..at + 2).ok_or("PUBLISH without a packet id")?;
        at += 2;
        Some(u16::from_be_bytes([b[0], b[1]]))
    } else {
        None
    };
    if at > body.len() {
        return Err("PUBLISH shorter than its topic");
    }
    Ok(Publish {
        qos,
        packet_id,
        payload: at..body.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_and_subscribe_bytes() {
        let mut out = Vec::new();
        write_connect(&mut out, "c");
        assert_eq!(
            out,
            vec![0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 0, 0, 1, b'c']
        );
        out.clear();
        write_subscribe_qos1(&mut out, 7, "u/1");
        assert_eq!(out, vec![0x82, 8, 0, 7, 0, 3, b'u', b'/', b'1', 1]);
    }

    #[test]
    fn publish_roundtrip_and_long_lengths() {
        let payload = vec![9u8; 300];
        let mut out = Vec::new();
        write_publish_qos1(&mut out, "u/42", 513, &payload);
        // 2 + 4 + 2 + 300 = 308 → two length bytes.
        assert_eq!(&out[..3], &[0x32, 0xb4, 0x02]);
        let p = parse_packet(&out).expect("ok").expect("complete");
        assert_eq!((p.kind, p.len), (PUBLISH, out.len()));
        let body = &out[p.body.clone()];
        let publ = parse_publish(p.flags, body).expect("publish");
        assert_eq!(publ.qos, 1);
        assert_eq!(publ.packet_id, Some(513));
        assert_eq!(&body[publ.payload], &payload[..]);
        assert_eq!(parse_packet(&out[..out.len() - 1]), Ok(None));
        assert_eq!(parse_packet(&out[..2]), Ok(None));
        assert!(parse_packet(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]).is_err());
    }

    #[test]
    fn small_packets() {
        let mut out = Vec::new();
        write_puback(&mut out, 5);
        write_disconnect(&mut out);
        let a = parse_packet(&out).expect("ok").expect("complete");
        assert_eq!((a.kind, a.body.clone()), (PUBACK, 2..4));
        let d = parse_packet(&out[a.len..]).expect("ok").expect("complete");
        assert_eq!((d.kind, d.len), (DISCONNECT, 2));
        assert!(parse_publish(0x06, &[0, 1, b'x']).is_err());
        assert!(
            parse_publish(0x02, &[0, 1, b'x']).is_err(),
            "QoS 1 needs a packet id"
        );
        assert_eq!(
            parse_publish(0x00, &[0, 1, b'x', 7]),
            Ok(Publish {
                qos: 0,
                packet_id: None,
                payload: 3..4
            })
        );
    }
}

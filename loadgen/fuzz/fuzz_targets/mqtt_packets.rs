//! Any bytes from the MQTT broker under test (`worker::on_mqtt_bytes`): `parse_packet` must not
//! panic, a complete packet must lie inside the buffer within `PACKET_BYTES_MAX`, a prefix of a
//! packet is incomplete, and the packets of a stream parse one after another the way the worker
//! walks them, with `parse_publish`'s payload inside the packet body. A PUBLISH written by
//! `write_publish_qos1` from fuzzed topic and payload parses back to the same id and payload.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_loadgen::mqtt::{
    parse_packet, parse_publish, write_publish_qos1, PACKET_BYTES_MAX, PUBLISH,
};

fuzz_target!(|data: &[u8]| {
    let mut used = 0;
    loop {
        let rest = &data[used..];
        let p = match parse_packet(rest) {
            Ok(Some(p)) => p,
            Ok(None) | Err(_) => break,
        };
        assert!(p.len <= rest.len());
        assert!(p.body.start >= 2 && p.body.start <= 5);
        assert_eq!(p.body.end, p.len);
        assert!(p.body.len() <= PACKET_BYTES_MAX);
        for k in 0..p.len {
            assert_eq!(parse_packet(&rest[..k]), Ok(None), "prefix {k}");
        }
        if p.kind == PUBLISH {
            let body = &rest[p.body.clone()];
            if let Ok(publ) = parse_publish(p.flags, body) {
                assert!(publ.payload.start <= publ.payload.end);
                assert_eq!(publ.payload.end, body.len());
                assert!(publ.qos <= 2);
                assert_eq!(publ.packet_id.is_some(), publ.qos > 0);
            }
        }
        used += p.len;
    }

    // Round trip: the first bytes pick a topic length and a packet id, the rest is the payload.
    if data.len() >= 3 {
        let topic_len = usize::from(data[0]) % 64;
        let pid = u16::from_be_bytes([data[1], data[2]]);
        let rest = &data[3..];
        let (topic, payload) = rest.split_at(topic_len.min(rest.len()));
        let topic = String::from_utf8_lossy(topic);
        let mut out = Vec::new();
        write_publish_qos1(&mut out, &topic, pid, payload);
        let p = parse_packet(&out).expect("own packet").expect("complete");
        assert_eq!((p.kind, p.len), (PUBLISH, out.len()));
        let body = &out[p.body.clone()];
        let publ = parse_publish(p.flags, body).expect("own publish");
        assert_eq!((publ.qos, publ.packet_id), (1, Some(pid)));
        assert_eq!(&body[publ.payload], payload);
    }
});

//! The KV wire format: a header, then the bytes of [`crate::backend::Backend::read_blocks`] in
//! chunks, each with its CRC-32. Optionally narrowed to f16 on the wire.

use half::{bf16, f16};
use pdfleet_api::proto::{kv_chunk, KvChunk, KvData, KvHeader};

use crate::config::KvDtype;

/// Chunk payload size: large enough to keep per-message overhead small, small enough to keep
/// memory and head-of-line blocking bounded.
pub const CHUNK_BYTES: usize = 256 * 1024;

/// Converts KV elements between dtypes (little endian).
pub fn convert(data: &[u8], from: KvDtype, to: KvDtype) -> Vec<u8> {
    if from == to {
        return data.to_vec();
    }
    let values: Vec<f32> = match from {
        KvDtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        KvDtype::F16 => data
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        KvDtype::Bf16 => data
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
    };
    let mut out = Vec::with_capacity(values.len() * to.bytes());
    for v in values {
        match to {
            KvDtype::F32 => out.extend(v.to_le_bytes()),
            KvDtype::F16 => out.extend(f16::from_f32(v).to_le_bytes()),
            KvDtype::Bf16 => out.extend(bf16::from_f32(v).to_le_bytes()),
        }
    }
    out
}

/// The message stream for one sequence: header first, then the data chunks.
pub fn chunks(header: KvHeader, data: Vec<u8>) -> Vec<KvChunk> {
    let mut out = vec![KvChunk {
        part: Some(kv_chunk::Part::Header(header)),
    }];
    for (i, c) in data.chunks(CHUNK_BYTES).enumerate() {
        out.push(KvChunk {
            part: Some(kv_chunk::Part::Data(KvData {
                index: i as u32,
                crc32: crc32fast::hash(c),
                data: c.to_vec(),
            })),
        });
    }
    out
}

/// Reassembles the data chunks, checking order, checksums and the announced size.
pub struct Assembler {
    expected_bytes: usize,
    next_index: u32,
    data: Vec<u8>,
}

impl Assembler {
    pub fn new(expected_bytes: usize) -> Self {
        Assembler {
            expected_bytes,
            next_index: 0,
            data: Vec::with_capacity(expected_bytes),
        }
    }

    pub fn push(&mut self, chunk: &KvData) -> Result<(), String> {
        if chunk.index != self.next_index {
            return Err(format!(
                "chunk {} arrived where {} was expected",
                chunk.index, self.next_index
            ));
        }
        if crc32fast::hash(&chunk.data) != chunk.crc32 {
            return Err(format!("chunk {} failed its checksum", chunk.index));
        }
        if self.data.len() + chunk.data.len() > self.expected_bytes {
            return Err(format!(
                "more than the announced {} bytes",
                self.expected_bytes
            ));
        }
        self.data.extend_from_slice(&chunk.data);
        self.next_index += 1;
        Ok(())
    }

    pub fn finish(self) -> Result<Vec<u8>, String> {
        if self.data.len() != self.expected_bytes {
            return Err(format!(
                "received {} of the announced {} bytes",
                self.data.len(),
                self.expected_bytes
            ));
        }
        Ok(self.data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_round_trip_and_detect_corruption() {
        let data: Vec<u8> = (0..(CHUNK_BYTES * 2 + 17))
            .map(|i| (i % 251) as u8)
            .collect();
        let msgs = chunks(KvHeader::default(), data.clone());
        assert_eq!(msgs.len(), 4);
        let datas: Vec<KvData> = msgs[1..]
            .iter()
            .map(|m| match &m.part {
                Some(kv_chunk::Part::Data(d)) => d.clone(),
                _ => panic!("data expected"),
            })
            .collect();
        let mut a = Assembler::new(data.len());
        for d in &datas {
            a.push(d).unwrap();
        }
        assert_eq!(a.finish().unwrap(), data);

        let mut bad = datas[1].clone();
        bad.data[3] ^= 1;
        let mut a = Assembler::new(data.len());
        a.push(&datas[0]).unwrap();
        assert!(a.push(&bad).unwrap_err().contains("checksum"));
        let mut a = Assembler::new(data.len());
        assert!(a
            .push(&datas[1])
            .unwrap_err()
            .contains("arrived where 0 was expected"));
        let mut a = Assembler::new(data.len());
        a.push(&datas[0]).unwrap();
        assert!(a.finish().unwrap_err().contains("announced"));
    }

    #[test]
    fn f16_on_the_wire_halves_the_bytes_and_round_trips_closely() {
        let vals = [0.5f32, -1.25, 3.0e-3, 7.0];
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let wire = convert(&bytes, KvDtype::F32, KvDtype::F16);
        assert_eq!(wire.len(), bytes.len() / 2);
        let back = convert(&wire, KvDtype::F16, KvDtype::F32);
        for (b, v) in back.chunks_exact(4).zip(vals) {
            let x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            assert!((x - v).abs() <= v.abs() * 1e-3);
        }
    }
}

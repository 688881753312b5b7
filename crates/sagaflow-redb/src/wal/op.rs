//! The table changes a write-ahead entry holds, and their encoding.

use crate::error::{Error, Result};

/// One table change, as logged and replayed. Each variant is what [`crate::store::Tables`] does
/// to its indexes at one transition, so replaying a batch's ops repeats its writes exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    /// A saga began: its request id, number and start time indexed.
    Begun { request_id: String, seq: u64, created_ms: u64 },
    /// A saga ended at `ended_ms`: out of the running ones, into retention's index.
    Ended { seq: u64, ended_ms: u64 },
    /// An ended saga runs again (a stuck saga retried).
    Revived { seq: u64 },
    /// A saga's record, encoded.
    Stored { seq: u64, record: Vec<u8> },
    /// Written by the write-ahead file itself, first in the first entry of an epoch: the
    /// entries of the epoch before end at this offset of their half. Changes no table.
    Sealed { previous_end: u64 },
}

impl Op {
    const BEGUN: u8 = 1;
    const ENDED: u8 = 2;
    const REVIVED: u8 = 3;
    const STORED: u8 = 4;
    const SEALED: u8 = 5;

    /// Appends the op's encoding to `out`.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Op::Begun { request_id, seq, created_ms } => {
                out.push(Self::BEGUN);
                put_bytes(out, request_id.as_bytes());
                out.extend_from_slice(&seq.to_le_bytes());
                out.extend_from_slice(&created_ms.to_le_bytes());
            }
            Op::Ended { seq, ended_ms } => {
                out.push(Self::ENDED);
                out.extend_from_slice(&seq.to_le_bytes());
                out.extend_from_slice(&ended_ms.to_le_bytes());
            }
            Op::Revived { seq } => {
                out.push(Self::REVIVED);
                out.extend_from_slice(&seq.to_le_bytes());
            }
            Op::Stored { seq, record } => {
                out.push(Self::STORED);
                out.extend_from_slice(&seq.to_le_bytes());
                put_bytes(out, record);
            }
            Op::Sealed { previous_end } => {
                out.push(Self::SEALED);
                out.extend_from_slice(&previous_end.to_le_bytes());
            }
        }
    }

    /// Where the previous epoch's entries end, if `payload` starts with an [`Op::Sealed`].
    pub(crate) fn sealed(payload: &[u8]) -> Option<u64> {
        match payload.split_first() {
            Some((&Self::SEALED, rest)) => Some(u64::from_le_bytes(rest.get(..8)?.try_into().ok()?)),
            _ => None,
        }
    }

    /// The ops of one entry's payload.
    pub(crate) fn decode_all(mut payload: &[u8]) -> Result<Vec<Op>> {
        let mut ops = Vec::new();
        while let Some((&tag, rest)) = payload.split_first() {
            payload = rest;
            let op = match tag {
                Self::BEGUN => {
                    let request_id = String::from_utf8(take_bytes(&mut payload)?.to_vec())
                        .map_err(|_| corrupt("request id not UTF-8"))?;
                    Op::Begun { request_id, seq: take_u64(&mut payload)?, created_ms: take_u64(&mut payload)? }
                }
                Self::ENDED => Op::Ended { seq: take_u64(&mut payload)?, ended_ms: take_u64(&mut payload)? },
                Self::REVIVED => Op::Revived { seq: take_u64(&mut payload)? },
                Self::STORED => {
                    let seq = take_u64(&mut payload)?;
                    Op::Stored { seq, record: take_bytes(&mut payload)?.to_vec() }
                }
                Self::SEALED => Op::Sealed { previous_end: take_u64(&mut payload)? },
                other => return Err(corrupt(&format!("unknown op {other}"))),
            };
            ops.push(op);
        }
        Ok(ops)
    }
}

fn corrupt(why: &str) -> Error {
    Error::Corrupt(format!("write-ahead entry: {why}"))
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // Records and request ids are far below 4 GiB; a longer one would be cut by its own length.
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn take<'a>(payload: &mut &'a [u8], n: usize) -> Result<&'a [u8]> {
    if payload.len() < n {
        return Err(corrupt("cut short"));
    }
    let (head, rest) = payload.split_at(n);
    *payload = rest;
    Ok(head)
}

fn take_u64(payload: &mut &[u8]) -> Result<u64> {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(take(payload, 8)?);
    Ok(u64::from_le_bytes(bytes))
}

fn take_bytes<'a>(payload: &mut &'a [u8]) -> Result<&'a [u8]> {
    let mut len = [0u8; 4];
    len.copy_from_slice(take(payload, 4)?);
    take(payload, u32::from_le_bytes(len) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops() -> Vec<Op> {
        vec![
            Op::Begun { request_id: "req-é".into(), seq: 7, created_ms: 1_700_000_000_000 },
            Op::Stored { seq: 7, record: b"{\"a\":1}".to_vec() },
            Op::Ended { seq: 7, ended_ms: 1_700_000_000_050 },
            Op::Revived { seq: 7 },
            Op::Sealed { previous_end: 4242 },
        ]
    }

    #[test]
    fn ops_round_trip() {
        let mut payload = Vec::new();
        ops().iter().for_each(|op| op.encode(&mut payload));
        assert_eq!(Op::decode_all(&payload).unwrap(), ops());
        // Cut anywhere inside, it is refused, not misread.
        for cut in 1..payload.len() {
            let decoded = Op::decode_all(&payload[..cut]);
            assert!(decoded.is_err() || decoded.unwrap().len() < ops().len(), "cut at {cut}");
        }
    }
}

//! Message ids: what follows one request through the gateway's and the connector's logs.

use ring::rand::SecureRandom;
use time::OffsetDateTime;

/// Message ids: 8 random bytes chosen at start (so two gateway instances or two runs do not
/// repeat each other) and a counter, as 32 hex digits. The id only has to follow one request
/// through the logs; a counter costs no system call per request, where fresh randomness did.
pub(crate) struct MessageIds {
    /// A random 64-bit number in hex, made once: ids from two gateway runs do not collide.
    prefix: String,
    next: std::sync::atomic::AtomicU64,
}

impl MessageIds {
    pub(crate) fn new(random: &ring::rand::SystemRandom) -> MessageIds {
        let mut bytes = [0u8; 8];
        if random.fill(&mut bytes).is_err() {
            let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos();
            bytes.copy_from_slice(&(nanos as u64).to_be_bytes());
        }
        MessageIds {
            prefix: format!("{:016x}", u64::from_be_bytes(bytes)),
            next: std::sync::atomic::AtomicU64::new(1),
        }
    }

    /// The prefix and a counter, 32 lower-case hex digits, made without the formatting
    /// machinery, which cost every request more than the rest of the id.
    pub(crate) fn next(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut id = String::with_capacity(32);
        id.push_str(&self.prefix);
        for shift in (0..16).rev() {
            id.push(char::from(HEX[(n >> (shift * 4)) as usize & 0xf]));
        }
        id
    }
}

#[cfg(test)]
mod tests {
    use super::MessageIds;

    #[test]
    fn message_ids_are_the_prefix_and_a_counter_in_hex() {
        let ids = MessageIds::new(&ring::rand::SystemRandom::new());
        let first = ids.next();
        let second = ids.next();
        assert_eq!(first, format!("{}{:016x}", ids.prefix, 1));
        assert_eq!(second, format!("{}{:016x}", ids.prefix, 2));
        ids.next
            .store(0xfedc_ba98_7654_3210, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(&ids.next()[16..], "fedcba9876543210");
        assert!(first.len() == 32 && first.bytes().all(|b| b.is_ascii_hexdigit()));
    }
}

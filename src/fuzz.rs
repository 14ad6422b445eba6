//! Deterministic input generators for the fuzz tests of the parsers that face untrusted input
//! (PHI envelopes, context tokens, tenant ids): random inputs and mutations of a valid one (bit
//! flips, changed bytes, truncations, extensions, spliced garbage). Seeded, so a failure
//! reproduces; test builds only.

/// How many inputs each fuzz test draws: `PG_TENANCY_FUZZ_ITERATIONS`, or 50,000 (the CI
/// default; run with 1000000 or more before a release).
pub(crate) fn iterations() -> usize {
    std::env::var("PG_TENANCY_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000)
}

/// xorshift64*: fast, good enough to drive mutations, and reproducible.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`n` > 0).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub(crate) fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }

    /// One mutation of `valid`, or (one time in eight) random bytes of a random length.
    pub(crate) fn mutate(&mut self, valid: &[u8]) -> Vec<u8> {
        let mut v = valid.to_vec();
        match self.below(8) {
            0 if !v.is_empty() => {
                let i = self.below(v.len());
                v[i] ^= 1 << self.below(8);
            }
            1 if !v.is_empty() => {
                let i = self.below(v.len());
                v[i] = self.next_u64() as u8;
            }
            2 => v.truncate(self.below(v.len() + 1)),
            3 => {
                let extra = self.below(40) + 1;
                let tail = self.bytes(extra);
                v.extend(tail);
            }
            4 if !v.is_empty() => {
                let at = self.below(v.len());
                let len = self.below(16) + 1;
                let junk = self.bytes(len);
                v.splice(at..(at + len).min(v.len()), junk);
            }
            5 if v.len() > 1 => {
                let (i, j) = (self.below(v.len()), self.below(v.len()));
                v.swap(i, j);
            }
            6 => {
                for _ in 0..self.below(4) + 2 {
                    if !v.is_empty() {
                        let i = self.below(v.len());
                        v[i] ^= 1 << self.below(8);
                    }
                }
            }
            _ => {
                let len = self.below(valid.len() * 2 + 8);
                v = self.bytes(len);
            }
        }
        v
    }

    /// A random string over a nasty alphabet: ASCII, quotes, backslashes, spaces, controls,
    /// multibyte characters and the characters of UUIDs.
    pub(crate) fn string(&mut self, max_len: usize) -> String {
        const ALPHABET: &[char] = &[
            'a', 'f', '0', '9', '-', 'A', 'F', 'z', ' ', '\'', '"', '\\', ';', '\t', '\n', '\u{1}',
            '\u{7f}', 'é', '€', '😀', '{', '}', '.', '_', ':', '=', '%', '\u{200b}',
        ];
        let len = self.below(max_len + 1);
        (0..len)
            .map(|_| ALPHABET[self.below(ALPHABET.len())])
            .collect()
    }
}

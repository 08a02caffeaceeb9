//! Fuzzes the signed checkpoint parser (`chain::note`): a checkpoint record's
//! payload is untrusted bytes from the WAL or the table. Parsing never panics,
//! and a note that parses and is signed again parses to the same checkpoint.
#![no_main]

use auditwal::chain::{Checkpoint, Signer};
use libfuzzer_sys::fuzz_target;

static SIGNER: std::sync::OnceLock<Signer> = std::sync::OnceLock::new();

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = Checkpoint::parse(data) {
        let signer = SIGNER.get_or_init(|| Signer::generate("fuzz"));
        let again = c.sign(&signer);
        let reopened =
            Checkpoint::open(again.as_bytes(), &signer.verifier()).expect("a re-signed note opens");
        assert_eq!(reopened, c);
    }
});

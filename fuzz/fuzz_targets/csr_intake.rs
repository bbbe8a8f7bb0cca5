//! `csr::parse_csr` on arbitrary bytes: the controller's CSR intake must refuse bad input
//! with an error, never panic.
#![no_main]

use causeway_controller::csr::parse_csr;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(key) = parse_csr(data) {
        // Formatting what an accepted CSR asked for (the controller logs it) must not
        // panic either.
        let _ = format!("{:?}", key.requested_names);
    }
});

//! The registry parsers on arbitrary bytes: a Consul health answer, a Eureka
//! applications document (JSON or XML), and an external-services file never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = causeway_registry::consul::parse_health("consul-dc1", Some("dc1"), data);
    let _ = causeway_registry::eureka::parse_applications("eureka", data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = causeway_registry::file::parse_services_file("external", text);
    }
});

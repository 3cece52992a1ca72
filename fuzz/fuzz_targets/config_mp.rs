//! The mp's configuration file, through the parse and checks of its `load`. What loads is
//! written back as `write` writes it and loads again the same.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = std::path::Path::new("/etc/portcullis/mp.toml");
    match mp::MpConfig::parse(text, path) {
        Ok(config) => {
            let written = match toml::to_string(&config) {
                Ok(written) => written,
                Err(e) => panic!("a configuration that loads cannot be written: {e}"),
            };
            match mp::MpConfig::parse(&written, path) {
                Ok(again) => assert_eq!(again, config, "{written}"),
                Err(e) => panic!("what was written does not load: {e}\n{written}"),
            }
        }
        Err(e) => portcullis_fuzz::logged(&e.to_string()),
    }
});

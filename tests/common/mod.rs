//! Helpers shared by the integration tests: real servers on 127.0.0.1:0.
//! (The STT, recorder and SMTP helpers next to this file are included by their tests with
//! `#[path = "common/…"]`, so a test binary compiles only the helpers it uses.)

pub mod http;

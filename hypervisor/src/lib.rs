//! The process-domain platform: the trusted core that runs inside domain 0.

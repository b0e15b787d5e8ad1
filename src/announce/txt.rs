//! The DNS-SD TXT record of `_opencode._tcp` advertisements (to be filled by
//! the mDNS work).

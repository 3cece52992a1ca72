//! `portcullis bench connections`: many idle device connections with mutual TLS held open to
//! one gateway, to measure what each costs the gateway in memory and how fast they open.

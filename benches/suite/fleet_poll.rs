//! Scenario 6: N machines, each its own account and key, polling one sshd with bounded
//! concurrency. Every machine is installed first (one real update each), so a poll is the
//! everyday no-change poll. bento: `bento agent update` per machine; baseline: a fresh
//! `sftp` session per machine listing its timestamp file. Polls per second and failures.

use std::fs;
use std::time::Instant;

use crate::data::pool;
use crate::machine::{sftp, Machine, EXIT_NOOP, EXIT_UPDATED};
use crate::server::{Scratch, Server};
use crate::table::{Row, Samples, Unit};
use crate::Config;

pub fn run(cfg: &Config, rows: &mut Vec<Row>) {
    let (counts, concurrency): (&[usize], usize) = if cfg.smoke {
        (&[2], 2)
    } else if cfg.quick {
        (&[4, 12], 4)
    } else {
        (&[50, 200, 500], 16)
    };
    let max = *counts.iter().max().unwrap();
    let hosts: Vec<String> = (0..max).map(|i| format!("p{i:04}")).collect();
    let scratch = Scratch::new("fleet");
    let t = Instant::now();
    let server = Server::start(&scratch.join("srv"), &hosts);
    eprintln!(
        "   {max} accounts and keys: {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // The same configuration everywhere, so one Nix build serves every machine.
    for h in &hosts {
        fs::write(
            server
                .fleet()
                .join("hosts")
                .join(h)
                .join("configuration.nix"),
            "{ ... }: { hostName = \"poll\"; }\n",
        )
        .unwrap();
    }
    server.publish();
    for h in &hosts {
        let plain = server.host_dir(h).join("plain");
        fs::create_dir_all(&plain).unwrap();
        fs::write(plain.join("stamp"), "1\n").unwrap();
    }
    let machines: Vec<Machine> = hosts
        .iter()
        .map(|h| Machine::new(&server, h, &scratch.join("m").join(h), server.port))
        .collect();
    let t = Instant::now();
    pool(&machines, 4, |m| {
        m.update_expect(EXIT_UPDATED);
    });
    eprintln!(
        "   {max} machines installed: {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let s = format!("6. N machines polling one sshd, {concurrency} at a time");
    for &n in counts {
        let reps = if n >= 200 { 1 } else { cfg.reps.min(3) };
        let (mut b_rate, mut b_fail) = (Samples::default(), Samples::default());
        let (mut p_rate, mut p_fail) = (Samples::default(), Samples::default());
        for _ in 0..reps {
            let t = Instant::now();
            let codes = pool(&machines[..n], concurrency, |m| m.update().code());
            b_rate.push(n as f64 / t.elapsed().as_secs_f64());
            let failed: Vec<&i32> = codes.iter().filter(|c| **c != EXIT_NOOP).collect();
            if !failed.is_empty() {
                eprintln!("   bento: {} of {n} polls failed: {failed:?}", failed.len());
            }
            b_fail.push(failed.len() as f64);

            let t = Instant::now();
            let ok = pool(&hosts[..n], concurrency, |h| {
                let kh = scratch.join("m").join(h).join("known_hosts");
                let r = sftp(&server, h, server.port, &kh, "ls -l plain/stamp\n");
                r.status.success() && String::from_utf8_lossy(&r.stdout).contains("stamp")
            });
            p_rate.push(n as f64 / t.elapsed().as_secs_f64());
            p_fail.push(ok.iter().filter(|ok| !**ok).count() as f64);
        }
        let f = b_fail.max();
        rows.push(
            Row::new(&s, &format!("N = {n}: polls per second"), Unit::PerSec)
                .bento(b_rate)
                .baseline(p_rate),
        );
        rows.push(
            Row::new(&s, &format!("N = {n}: failed polls"), Unit::Count)
                .bento(b_fail)
                .baseline(p_fail)
                .goal(format!("none; {f:.0}"), f == 0.0),
        );
    }
    drop(machines);
    drop(server);
}

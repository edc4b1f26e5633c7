//! Invariants of the paged KV cache and the continuous-batching scheduler, on the CPU backend.

mod common;

use common::{engine, greedy, tokens};
use pdfleet_worker::backend::BackendKind;
use pdfleet_worker::config::ModelConfig;
use pdfleet_worker::engine::{generate_all, FinishReason, SamplingParams, SchedulerConfig};
use pdfleet_worker::EngineError;

fn sched(max_batch_tokens: usize, chunk_size: usize, max_running: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_batch_tokens,
        chunk_size,
        max_running,
    }
}

fn mixed_requests(n: u64) -> Vec<(Vec<u32>, SamplingParams)> {
    (0..n)
        .map(|i| {
            let prompt = tokens(i, 1 + (i as usize * 53) % 90, 100);
            let params = SamplingParams {
                max_tokens: 1 + (i as usize * 7) % 30,
                temperature: if i % 4 == 1 { 0.7 } else { 0.0 },
                seed: i,
                stop_token: None,
            };
            (prompt, params)
        })
        .collect()
}

#[test]
fn no_block_leaks_after_a_mix_of_requests_aborts_and_preemptions() {
    let c = ModelConfig::default();
    let mut e = engine(BackendKind::Cpu, &c, 24, 4, sched(64, 16, 6));
    for (i, (p, s)) in mixed_requests(30).into_iter().enumerate() {
        e.add_request(i as u64, p, s).unwrap();
    }
    let mut steps = 0;
    while e.has_work() {
        e.step().unwrap();
        e.check_block_accounting([]).unwrap();
        steps += 1;
        if steps == 5 {
            assert!(e.abort(3) && e.abort(29));
        }
    }
    assert!(
        e.preemptions() > 0,
        "the small cache should have forced preemption"
    );
    assert_eq!(
        e.blocks_used(),
        0,
        "every block is free or merely cached once all requests end"
    );
}

#[test]
fn a_finished_sequence_frees_its_blocks_in_the_same_step() {
    let c = ModelConfig::default();
    let mut e = engine(BackendKind::Cpu, &c, 64, 4, sched(512, 512, 8));
    e.add_request(1, tokens(1, 10, 100), greedy(3)).unwrap();
    e.add_request(2, tokens(2, 30, 100), greedy(50)).unwrap();
    loop {
        let out = e.step().unwrap();
        if out.finished.iter().any(|(id, _)| *id == 1) {
            // Request 2 alone remains: it holds exactly the blocks for its computed tokens.
            assert_eq!(e.num_running(), 1);
            assert_eq!(e.blocks_used(), (30 + 2usize).div_ceil(4));
            break;
        }
    }
}

#[test]
fn a_shared_prefix_is_reused_and_gives_the_same_tokens() {
    let c = ModelConfig::default();
    let shared = tokens(9, 48, 100);
    let mut second = shared.clone();
    second.extend(tokens(10, 20, 100));
    let mut e = engine(BackendKind::Cpu, &c, 128, 16, SchedulerConfig::default());
    let first = generate_all(&mut e, vec![(shared.clone(), greedy(5))]).unwrap();
    let before = e.prefix_stats();
    let reused = generate_all(&mut e, vec![(second.clone(), greedy(12))]).unwrap();
    let after = e.prefix_stats();
    assert_eq!(
        after.hits - before.hits,
        48,
        "three full blocks of the shared prefix are reused"
    );
    assert_eq!(after.queries - before.queries, second.len() as u64);
    let mut fresh = engine(BackendKind::Cpu, &c, 128, 16, SchedulerConfig::default());
    assert_eq!(
        generate_all(&mut fresh, vec![(second, greedy(12))]).unwrap(),
        reused
    );
    assert_eq!(first[0].len(), 5);
}

#[test]
fn preemption_resumes_to_the_same_tokens() {
    let c = ModelConfig {
        dim: 32,
        n_heads: 2,
        n_kv_heads: 1,
        n_layers: 2,
        ..Default::default()
    };
    let requests = mixed_requests(12);
    let mut roomy = engine(BackendKind::Cpu, &c, 1024, 4, sched(64, 16, 12));
    let expected = generate_all(&mut roomy, requests.clone()).unwrap();
    assert_eq!(roomy.preemptions(), 0);
    let mut tight = engine(BackendKind::Cpu, &c, 32, 4, sched(64, 16, 12));
    let got = generate_all(&mut tight, requests).unwrap();
    assert!(
        tight.preemptions() > 0,
        "the tight cache should have preempted"
    );
    assert_eq!(got, expected);
}

#[test]
fn chunked_prefill_interleaves_with_decodes_and_changes_no_token() {
    let c = ModelConfig::default();
    let long = tokens(5, 300, 100);
    let mut whole = engine(BackendKind::Cpu, &c, 256, 16, sched(1024, 1024, 8));
    let expected = generate_all(
        &mut whole,
        vec![(tokens(4, 8, 100), greedy(40)), (long.clone(), greedy(10))],
    )
    .unwrap();

    let mut chunked = engine(BackendKind::Cpu, &c, 256, 16, sched(64, 32, 8));
    chunked
        .add_request(0, tokens(4, 8, 100), greedy(40))
        .unwrap();
    let mut got = vec![Vec::new(), Vec::new()];
    got[0].extend(chunked.step().unwrap().tokens.iter().map(|t| t.token));
    chunked.add_request(1, long, greedy(10)).unwrap();
    let mut mixed_steps = 0;
    while chunked.has_work() {
        let out = chunked.step().unwrap();
        assert!(out.prefill_tokens <= 32, "one chunk per step at most");
        if out.prefill_tokens > 0 && out.decode_tokens > 0 {
            mixed_steps += 1;
        }
        for t in out.tokens {
            got[t.id as usize].push(t.token);
        }
    }
    // The 300-token prompt takes ten chunks, each batched with the other request's decode.
    assert!(
        mixed_steps >= 9,
        "only {mixed_steps} steps mixed prefill and decode"
    );
    assert_eq!(got, expected);
}

#[test]
fn a_stop_token_ends_the_sequence() {
    let c = ModelConfig::default();
    let mut probe = engine(BackendKind::Cpu, &c, 64, 16, SchedulerConfig::default());
    let free_run = generate_all(&mut probe, vec![(tokens(3, 12, 100), greedy(20))]).unwrap();
    let stop = free_run[0][4];
    let first = free_run[0].iter().position(|&t| t == stop).unwrap();
    let mut e = engine(BackendKind::Cpu, &c, 64, 16, SchedulerConfig::default());
    e.add_request(
        0,
        tokens(3, 12, 100),
        SamplingParams {
            stop_token: Some(stop),
            ..greedy(20)
        },
    )
    .unwrap();
    let mut reason = None;
    let mut n = 0;
    while e.has_work() {
        let out = e.step().unwrap();
        n += out.tokens.len();
        reason = out.finished.first().map(|f| f.1).or(reason);
    }
    assert_eq!((n, reason), (first + 1, Some(FinishReason::Stop)));
}

#[test]
fn requests_that_could_never_run_are_refused_with_a_reason() {
    let c = ModelConfig {
        max_seq_len: 64,
        ..Default::default()
    };
    let mut e = engine(BackendKind::Cpu, &c, 8, 4, SchedulerConfig::default());
    let msg = |r: Result<(), EngineError>| r.unwrap_err().to_string();
    assert!(msg(e.add_request(1, vec![], greedy(1))).contains("prompt is empty"));
    assert!(msg(e.add_request(2, vec![5, 100], greedy(1)))
        .contains("token id 100 is outside the vocabulary"));
    assert!(
        msg(e.add_request(3, vec![1; 60], greedy(8))).contains("exceeds the model's context of 64")
    );
    assert!(msg(e.add_request(4, vec![1; 30], greedy(8)))
        .contains("needs 10 KV blocks but the cache has 8"));
    assert!(msg(e.add_request(5, vec![1], greedy(0))).contains("max_tokens must be at least 1"));
    e.add_request(6, vec![1, 2], greedy(2)).unwrap();
    assert!(msg(e.add_request(6, vec![1, 2], greedy(2))).contains("already in use"));
}

#[test]
fn hostile_imports_are_refused_and_free_their_blocks() {
    let c = ModelConfig {
        max_seq_len: 64,
        ..Default::default()
    };
    let mut e = engine(BackendKind::Cpu, &c, 32, 4, SchedulerConfig::default());
    // Prompt of 8 tokens plus the first generated one: 8 tokens of KV in 2 blocks.
    let good: Vec<u32> = (0..9).collect();
    let cases: Vec<(&str, Vec<u32>, usize, SamplingParams, usize)> = vec![
        (
            "outside the vocabulary",
            [&good[..8], &[100]].concat(),
            8,
            greedy(4),
            2,
        ),
        (
            "exceeds the model's context",
            vec![1; 61],
            60,
            greedy(8),
            15,
        ),
        ("not the 3 reserved", good.clone(), 8, greedy(4), 3),
        ("with a prompt of 0", good.clone(), 0, greedy(4), 2),
        ("with a prompt of 9", good.clone(), 9, greedy(4), 3),
        ("more than max_tokens", good.clone(), 6, greedy(2), 2),
    ];
    for (why, tokens, prompt_len, params, blocks) in cases {
        let r = e.reserve(blocks).unwrap();
        let err = e
            .commit(r, tokens, prompt_len, params, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains(why), "{why}: {err}");
        assert_eq!(e.blocks_used(), 0, "{why}: the blocks are freed");
    }
    // KV bytes of the wrong size are refused too.
    let r = e.reserve(2).unwrap();
    assert!(e
        .commit(r, good.clone(), 8, greedy(4), Some(&[0u8; 3]))
        .is_err());
    assert_eq!(e.blocks_used(), 0);
    // And the engine goes on: a proper import decodes.
    let r = e.reserve(2).unwrap();
    let parked = e.commit(r, good, 8, greedy(4), None).unwrap();
    e.attach(1, parked).unwrap();
    let mut n = 0;
    while e.has_work() {
        n += e.step().unwrap().tokens.len();
    }
    assert_eq!(n, 3, "the first token came with the import");
    e.check_block_accounting([]).unwrap();
}

#[test]
fn the_prompt_backlog_counts_what_is_left_and_admissions_are_reported_once() {
    let c = ModelConfig::default();
    // Chunks of 8, 16 tokens a step, two sequences at a time.
    let mut e = engine(BackendKind::Cpu, &c, 64, 4, sched(16, 8, 2));
    let prompts = [20usize, 12, 5];
    for (i, &n) in prompts.iter().enumerate() {
        e.add_request(i as u64, tokens(i as u64, n, 100), greedy(3))
            .unwrap();
    }
    assert_eq!(e.queued_prompt_tokens(), 37);
    let mut admitted = Vec::new();
    let mut computed = 0;
    while e.has_work() {
        let before = e.queued_prompt_tokens();
        let out = e.step().unwrap();
        admitted.extend(out.admitted.iter().copied());
        computed += out.prefill_tokens;
        // What a step computes of prompts leaves the backlog.
        assert_eq!(before - e.queued_prompt_tokens(), out.prefill_tokens);
    }
    assert_eq!(computed, 37);
    admitted.sort_unstable();
    assert_eq!(
        admitted,
        vec![0, 1, 2],
        "each sequence leaves the queue once"
    );
    assert_eq!(e.queued_prompt_tokens(), 0);
}

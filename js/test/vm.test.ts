/**
 * The VM tests, in one process so they share booted sandboxes: the spec's
 * TypeScript examples first (they create the sandboxes), then the rest of
 * the SDK, then the kill example; everything is killed at the end.
 */
import { after } from 'node:test'
import { features } from './features.js'
import { specExamples, specKillExample } from './spec-examples.js'
import { killAll } from './support/state.js'

specExamples()
features()
specKillExample()
after(killAll)

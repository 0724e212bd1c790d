// The official TypeScript firehose consumer (@atproto/sync `Firehose`, authenticated commits)
// reading the replay upstream's firehose; started by bench/peers.py.
//
//   NODE_PATH=<dir>/node_modules node bench/peer_atproto_sync.mjs WS_URL PLC_URL N_COMMITS
//
// Verification is @atproto/sync's own (parseCommitAuthenticated): lexicon validation of the
// message, the signing key from the DID document (PLC, cached in a MemoryCache as a real
// consumer would), CAR block hashes, commit signature and an MST proof of every op
// (`verifyProofs`), then every record decoded to a lex value. No Sync 1.1 inversion (prevData)
// and no persistence or delivery. Events are processed one at a time (no runner), the
// library's default. Prints one JSON line: counts, first/last event times (performance.now()
// based, ms) and process CPU.
import { createRequire } from 'node:module'
import path from 'node:path'
import { pathToFileURL } from 'node:url'

const require = createRequire(path.join(process.env.NODE_PATH || process.cwd(), 'x.js'))
const load = (name) => import(pathToFileURL(require.resolve(name)).href)
const { Firehose } = await load('@atproto/sync')
const { IdResolver, MemoryCache } = await load('@atproto/identity')

const [, , service, plcUrl, nStr] = process.argv
const want = Number(nStr)
// globalThis.fetch: the default SSRF-safe fetch refuses loopback PLC URLs (as its docs say for tests)
const idResolver = new IdResolver({ plcUrl, didCache: new MemoryCache(), fetch: globalThis.fetch })
let commits = 0
let events = 0
let errors = 0
let lastSeq = -1
let tFirst = 0
let tHalf = 0
let cHalf = 0
const cpu0 = process.cpuUsage()
const t0 = performance.now()
let done = false

const finish = async (fh) => {
  if (done) return
  done = true
  const t = performance.now()
  const cpu = process.cpuUsage(cpu0)
  console.log(JSON.stringify({
    commits, events, errors, t_first_ms: tFirst - t0, t_last_ms: t - t0, t_half_ms: tHalf - t0, commits_half: cHalf,
    cpu_s: (cpu.user + cpu.system) / 1e6, rss_mb: process.memoryUsage().rss / 1e6,
  }))
  setTimeout(() => process.exit(0), 50)
  fh.destroy().catch(() => {})
}

const fh = new Firehose({
  service,
  idResolver,
  unauthenticatedCommits: false,
  excludeIdentity: true,
  excludeAccount: true,
  excludeSync: true,
  handleEvent: async (evt) => {
    events++
    if (!tFirst) tFirst = performance.now()
    if (evt.seq !== lastSeq) {
      lastSeq = evt.seq
      commits++
      if (commits === Math.floor(want / 2)) { tHalf = performance.now(); cHalf = commits }
      if (commits >= want) await finish(fh)
    }
  },
  onError: (err) => {
    errors++
    if (errors < 5) console.error(String(err), err.cause ? String(err.cause) : '')
  },
})
fh.start()
setTimeout(() => finish(fh), Number(process.env.PEER_TIMEOUT_MS || 600000))

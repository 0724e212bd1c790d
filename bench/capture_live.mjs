// Live writes on EXISTING accounts of the PDS harness, for bench/capture.py.
//
//   HARNESS_PDS_DIR=../shared/harness/pds PDS=http://127.0.0.1:PORT COMMITS=3000 CONCURRENCY=8 \
//     node bench/capture_live.mjs DID...
//
// Logs in to every account (password of the harness scripts), reads its records
// (listRecords), then makes COMMITS single-op commits spread over the accounts, CONCURRENCY
// at a time (writes to one repo are serialised by the PDS anyway): ~70% createRecord (posts,
// likes of existing posts, follows of other accounts), ~10% putRecord (update of a post),
// ~20% deleteRecord. stdout: one JSON line {ok, commits, ops: {create, update, delete}, secs}.
import path from 'node:path'
import { pathToFileURL } from 'node:url'

const dir = process.env.HARNESS_PDS_DIR
const X = await import(pathToFileURL(path.join(dir, 'xrpc.mjs')).href)
const PDS = process.env.PDS
const COMMITS = Number(process.env.COMMITS || 3000)
const CONCURRENCY = Number(process.env.CONCURRENCY || 8)
const dids = process.argv.slice(2)
let seed = 12345
const rnd = () => { seed = (seed * 1103515245 + 12345) & 0x7fffffff; return seed / 0x80000000 }

const accounts = []
const t0 = performance.now()
for (let i = 0; i < dids.length; i += 16) {
  const part = await Promise.all(dids.slice(i, i + 16).map(async (did) => {
    const s = await X.createSession(PDS, did)
    const posts = []
    let cursor
    do {
      const res = await X.xrpc(PDS, 'com.atproto.repo.listRecords', {
        params: { repo: did, collection: 'app.bsky.feed.post', limit: 100, ...(cursor ? { cursor } : {}) },
      })
      for (const r of res.records) posts.push({ uri: r.uri, cid: r.cid })
      cursor = res.records.length === 100 ? res.cursor : undefined
    } while (cursor && posts.length < 300)
    return { did, auth: s.accessJwt, posts, mine: [] }
  }))
  accounts.push(...part)
}
const ops = { create: 0, update: 0, delete: 0 }
let done = 0
let failed = 0
const busy = new Set()

async function one() {
  let a
  do { a = accounts[Math.floor(rnd() * accounts.length)] } while (busy.has(a.did) && busy.size < accounts.length)
  busy.add(a.did)
  try {
    const r = rnd()
    const repo = a.did
    if (r < 0.7 || a.mine.length + a.posts.length < 5) {
      const k = rnd()
      let collection, record
      if (k < 0.5) {
        collection = 'app.bsky.feed.post'
        record = X.post(`live ${done} ${Math.floor(rnd() * 1e9).toString(36)}`)
      } else if (k < 0.85) {
        const other = accounts[Math.floor(rnd() * accounts.length)]
        const p = other.posts[Math.floor(rnd() * other.posts.length)]
        collection = 'app.bsky.feed.like'
        record = { $type: collection, subject: { uri: p.uri, cid: p.cid }, createdAt: new Date().toISOString() }
      } else {
        collection = 'app.bsky.graph.follow'
        const other = accounts[Math.floor(rnd() * accounts.length)]
        record = { $type: collection, subject: other.did, createdAt: new Date().toISOString() }
      }
      const res = await X.xrpc(PDS, 'com.atproto.repo.createRecord', { auth: a.auth, body: { repo, collection, record } })
      a.mine.push({ uri: res.uri, cid: res.cid, collection })
      ops.create++
    } else if (r < 0.8) {
      const p = a.posts[Math.floor(rnd() * a.posts.length)]
      const rkey = p.uri.split('/').pop()
      const res = await X.xrpc(PDS, 'com.atproto.repo.putRecord', {
        auth: a.auth, body: { repo, collection: 'app.bsky.feed.post', rkey, record: X.post(`edited ${done}`) },
      })
      p.cid = res.cid
      ops.update++
    } else {
      const pool = a.mine.length ? a.mine : a.posts
      const i = Math.floor(rnd() * pool.length)
      const p = pool.splice(i, 1)[0]
      const [, , , collection, rkey] = p.uri.split('/')
      await X.xrpc(PDS, 'com.atproto.repo.deleteRecord', { auth: a.auth, body: { repo, collection, rkey } })
      ops.delete++
    }
  } catch (e) {
    failed++
    if (failed < 5) console.error(String(e?.message || e))
  } finally {
    busy.delete(a.did)
  }
}

const t1 = performance.now()
let started = 0
await Promise.all(Array.from({ length: CONCURRENCY }, async () => {
  while (started < COMMITS) {
    started++
    await one()
    done++
    if (done % 500 === 0) console.error(`[capture_live] ${done}/${COMMITS}`)
  }
}))
console.log(JSON.stringify({ ok: failed === 0, commits: done - failed, failed, ops,
  login_secs: (t1 - t0) / 1000, secs: (performance.now() - t1) / 1000 }))

// A Node.js gRPC client (@grpc/grpc-js, no generated code: messages are raw bytes) for the
// HTTP/2 end-to-end test: after a line on stdin, Get(42), Watch(42) and Get(missing) on one
// channel, then "done".
//
//     NODE_PATH=tests/.node/node_modules node grpc_client.js ADDR
const grpc = require("@grpc/grpc-js");
const readline = require("readline");

const client = new grpc.Client(process.argv[2], grpc.credentials.createInsecure());
const raw = (b) => b;

function get(body) {
  return new Promise((resolve) => {
    client.makeUnaryRequest("/shop.v1.Orders/Get", raw, raw, Buffer.from(body), (err, res) =>
      resolve(err ? err.code : res.toString()),
    );
  });
}

function watch(body) {
  return new Promise((resolve, reject) => {
    const n = [];
    const call = client.makeServerStreamRequest("/shop.v1.Orders/Watch", raw, raw, Buffer.from(body));
    call.on("data", (d) => n.push(d));
    call.on("end", () => resolve(n.length));
    call.on("error", reject);
  });
}

console.log("ready");
const rl = readline.createInterface({ input: process.stdin });
rl.once("line", async () => {
  const first = await get("42");
  const updates = await watch("42");
  const missing = await get("missing");
  if (!String(first).startsWith("order 42") || updates !== 3 || missing !== grpc.status.NOT_FOUND) {
    console.log(`unexpected: ${first} ${updates} ${missing}`);
    process.exit(1);
  }
  console.log("done");
  rl.once("line", () => process.exit(0));
});

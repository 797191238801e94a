/**
 * The TypeScript examples of the spec (sandbox-operations.md), verbatim. The
 * Create example's three parts each declare `sandbox`, so they are three
 * snippets. `uses` names what a snippet takes from an earlier one.
 */
export interface Snippet {
  code: string
  uses?: string[]
}

export const SNIPPETS = {
  createDefault: {
    code: `
import Sandbox from '@moru-ai/core'

// Default
const sandbox = await Sandbox.create()
`,
  },
  createTemplate: {
    code: `
// Specific template
const sandbox = await Sandbox.create("python")
`,
  },
  createOptions: {
    code: `
// With options
const sandbox = await Sandbox.create("python", {
  timeoutMs: 600000,          // 10 minutes (milliseconds)
  metadata: { project: "my-agent" },
  envs: { API_KEY: "secret" },
  allowInternetAccess: true,
  secure: true,
  volumeId: "vol_abc123",
  volumeMountPath: "/workspace",
  network: {
    allowOut: ["api.openai.com"],
    denyOut: [],
  }
})
`,
  },
  connect: {
    code: `
import Sandbox from '@moru-ai/core'

const sandbox = await Sandbox.connect("sbx_abc123...")

if (await sandbox.isRunning()) {
  const result = await sandbox.commands.run("echo 'Reconnected!'")
}
`,
  },
  info: {
    code: `
const sandbox = await Sandbox.create()

console.log(sandbox.sandboxId)

const info = await sandbox.getInfo()
console.log(\`Template: \${info.templateId}\`)
console.log(\`State: \${info.state}\`)
`,
  },
  timeout: {
    code: `
// At creation (milliseconds)
const sandbox = await Sandbox.create({ timeoutMs: 600000 })

// Extend later
await sandbox.setTimeout(1800000)
`,
  },
  kill: {
    code: `
await sandbox.kill()

// Or by ID
await Sandbox.kill("sbx_abc123...")
`,
    uses: ['sandbox'],
  },
  list: {
    code: `
const paginator = Sandbox.list()
for await (const info of paginator) {
  console.log(\`\${info.sandboxId}: \${info.state}\`)
}
`,
  },
} satisfies Record<string, Snippet>
